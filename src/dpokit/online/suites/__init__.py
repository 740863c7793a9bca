"""`dpokit eval --suite ...`: the evaluations DPO users report, offline-capable (docs/evaluation.md).

  ifeval        verifiable instructions (IFEval, Zhou et al. 2023): ifeval_checks (the checkers), ifeval (scoring)
  lc_winrate    length-controlled win rate (AlpacaEval 2, Dubois et al. 2024)
  multiturn     two-turn conversations scored by a judge (MT-Bench, Zheng et al. 2023)
  local_judge   a pairwise judge from a local HF model (log-probability of "A" vs "B"), no API needed
  view          policy vs baseline on every suite: one JSON and one markdown table
answers renders and samples chat turns for the suites; runner runs the suites `dpokit eval` was asked for.
The shipped prompt sets are in data/ (ifeval_data.py regenerates the IFEval-style one).
"""
