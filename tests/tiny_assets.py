"""Small local tokenizers, models and preference files shared by the trainer tests.

The word-level tokenizer makes expected token ids hand-checkable: every word and
special token is one id, looked up in `vocab`.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dpokit.tiny import build_tiny_llama, build_tokenizer, save_tiny

WORDS = (
    "the film was a movie it is and but very good bad great awful fine plot acting "
    "user assistant system hi hello how are you i am thanks what colour sky blue green "
    "tell me story once upon time yes no maybe Human: Assistant:"
).split()


@functools.lru_cache(maxsize=None)
def word_tokenizer():
    return build_tokenizer([" ".join(WORDS)], kind="word", vocab_size=1000)


def vocab_ids(text: str) -> list[int]:
    """Hand lookup: the id of each whitespace-separated word or special token."""
    vocab = word_tokenizer().get_vocab()
    return [vocab[w] for w in text.split()]


@functools.lru_cache(maxsize=None)
def tiny_model_dir(hidden_size: int = 32, seed: int = 0) -> Path:
    """A saved tiny Llama + word tokenizer folder, built once per test session."""
    tokenizer = word_tokenizer()
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=2, num_heads=4, seed=seed)
    return save_tiny(model, tokenizer, session_folder("dpokit-tiny-") / "model")


def session_folder(prefix: str) -> Path:
    """A temporary folder removed when the test session's process ends (tests share it through lru_cache)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def free_port() -> str:
    """A TCP port free right now on 127.0.0.1, for a launcher's rendezvous (tests may run in parallel workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(*args: str, procs: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`args` (a script and its arguments, or -m and a module) under torchrun with `procs` processes on one node, a
    free port, one thread each; output captured as text."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(procs),
        "--master_port",
        free_port(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)


PROMPT_WORDS = "the film was a movie it is and plot acting".split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """A learnable preference: after any prompt, 'good ...' is preferred over 'bad ...'.

    Both completions have the same length and share every word but the first,
    so only the learned preference (not length or content) separates them.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 5)))
        tail = " ".join(rng.choice(["fine", "plot", "acting", "very"]) for _ in range(rng.randint(0, 3)))
        rows.append({"prompt": prompt, "chosen": f" good {tail}".rstrip(), "rejected": f" bad {tail}".rstrip()})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    """A chat message of the user (conversational rows)."""
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    """A chat message of the assistant (conversational rows)."""
    return {"role": "assistant", "content": text}


# The demo world's word-level tokenizer and a tiny untrained model on it, as pytest fixtures: the
# evaluation, generation and demo-story tests import them (`from tiny_assets import model, tokenizer`).
@pytest.fixture(scope="module")
def tokenizer():
    from dpokit.demo import world

    return build_tokenizer([" ".join(world.vocabulary())], kind="word")


@pytest.fixture()
def model(tokenizer):
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
