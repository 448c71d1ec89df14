"""Shared fixtures for the OpenAI Python SDK contract tests (run by tests/contract.rs)."""
import json
import os

import openai
import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo test --test contract`")
    return value


@pytest.fixture(scope="session")
def cfg():
    """Base URL, key, model names and expected transcripts handed over by tests/contract.rs."""
    return {
        "base_url": _env("TOLLGATE_BASE_URL"),
        "api_key": _env("TOLLGATE_API_KEY"),
        "expect": json.loads(_env("TOLLGATE_CONTRACT_EXPECT")),
    }


@pytest.fixture
def client(cfg):
    return openai.OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=30)


@pytest.fixture
def expect(cfg):
    return cfg["expect"]
