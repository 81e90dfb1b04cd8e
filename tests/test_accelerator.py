"""DS_ACCELERATOR follows the hardware: the learner picks cuda or cpu itself (`select_accelerator`), a user's explicit
value wins, and the driver forwards DS_ACCELERATOR to actors only as the user set it (`actor_env`), so a driver on
a CPU-only head node never pins GPU learner ranks to DeepSpeed's CPU accelerator.

The test process shares its environment with every other test (conftest.py sets DS_ACCELERATOR=cpu):
monkeypatch.delenv / setenv put it back afterwards.
"""

from __future__ import annotations

import os

import pytest
import torch

from omni_ray.driver.cluster import actor_env
from omni_ray.learner.worker import select_accelerator


@pytest.fixture
def cuda(monkeypatch):
    """`cuda(True)`: this process sees a CUDA device; `cuda(False)`: it does not."""

    def set_available(available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    return set_available


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_unset_accelerator_follows_the_hardware(monkeypatch, cuda, available, expected):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cuda(available)
    assert select_accelerator() == expected
    assert os.environ["DS_ACCELERATOR"] == expected, "DeepSpeed reads the choice from the environment"


@pytest.mark.parametrize("available, user_value", [(True, "cpu"), (False, "cuda")])
def test_a_users_accelerator_wins_over_the_hardware(monkeypatch, cuda, available, user_value):
    monkeypatch.setenv("DS_ACCELERATOR", user_value)
    cuda(available)
    assert select_accelerator() == user_value


def test_actor_env_does_not_add_an_accelerator_of_its_own(monkeypatch, cuda):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cuda(True)
    env = actor_env()
    assert "DS_ACCELERATOR" not in env
    assert env["HF_HUB_OFFLINE"] == "1"  # the defaults actors need are still there


@pytest.mark.parametrize("available, user_value", [(True, "cpu"), (False, "cuda")])
def test_actor_env_forwards_the_users_accelerator(monkeypatch, cuda, available, user_value):
    monkeypatch.setenv("DS_ACCELERATOR", user_value)
    cuda(available)
    assert actor_env()["DS_ACCELERATOR"] == user_value
