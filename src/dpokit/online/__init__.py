"""The online layer: sampling, scoring, judges, pairing, the pipeline of DPO rounds, evaluation, the demo."""
