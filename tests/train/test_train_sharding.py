"""Training under the logical-axis rules on 8 fake CPU devices (one subprocess, compiles shared):

* generator steps on meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2), (1,2,4) equal one device;
* parameter, EMA and Adam-moment shardings are what `parallel.LOGICAL_RULES` says;
* a state checkpointed on 8 devices resumes on 4 and on 1 with the same next steps;
* remat and gradient accumulation change the compiled memory, not the result.

Tolerance: global relative L2 error of all trainable parameters < 1e-5 after 3 AdamW steps (float32;
sharded reductions sum in another order, ~1e-7 per step, and Adam's normalisation can amplify it on
near-zero gradients — docs/design.md §4c).
"""

from support import CONFIGS, run_program


def test_training_under_logical_rules(tmp_path):
  result = run_program("training_sharded.py", CONFIGS, str(tmp_path), devices=8, timeout=1800)
  print(result.stdout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "plan OK" in result.stdout
