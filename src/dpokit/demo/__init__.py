"""The `dpokit demo` world: a miniature of the DPO paper's controlled-sentiment experiment.

world: the review language and its exact sentiment reward; sft: the cached SFT
model and preference data; evaluate: before/after metrics of a policy.
"""
