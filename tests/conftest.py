"""Test set-up: offline, CPU only, and no socket may leave the machine (loopback only)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
for _var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
    os.environ.pop(_var, None)

sys.path.insert(0, str(Path(__file__).parent))

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise RuntimeError(f"tests may only connect to loopback addresses, not {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise RuntimeError(f"tests may only connect to loopback addresses, not {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tiny import make_tokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random Llama student (hidden 32, 2 layers) with the shared tokenizer and a chat template."""
    from tiny import make_model

    d = tmp_path_factory.mktemp("student")
    make_model(d, tokenizer_dir=tiny_tokenizer_dir, hidden_size=32, num_layers=2, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A (slightly) bigger tiny Llama teacher sharing the student's tokenizer."""
    from tiny import make_model

    d = tmp_path_factory.mktemp("teacher")
    make_model(d, tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96, seed=1)
    return d
