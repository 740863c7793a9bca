"""`dpokit eval --suite ...`: the evaluations DPO users report, offline-capable (docs/evaluation.md).

runner.SUITES is the table of suites, name -> Suite(help, run, rows, check_args) (suite.py): each suite is a
module (ifeval, lc_winrate, multiturn, ...) and one line there. Beside them:
  ifeval_checks  the IFEval checkers; ifeval_data regenerates the shipped IFEval-style prompt set
  local_judge    a pairwise judge from a local HF model (log-probability of "A" vs "B"), no API needed
  answers        renders and samples chat turns for the suites
  stats          the suites' means and standard errors
  view           policy vs baseline on every suite: one JSON and one markdown table
The shipped prompt sets are in data/.
"""
