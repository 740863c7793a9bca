"""The embedded demo's world: a miniature of the DPO paper's controlled-sentiment experiment.

world: the review language and its exact sentiment reward; sft: the cached SFT model and
preference data; assets: `demo:` paths in a config, built on first use. What `dpokit demo`
does with them (train, then compare before/after) is online/demo.py.
"""
