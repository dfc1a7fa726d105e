"""Shared pytest set-up: one torch thread (small models on small CPUs) and doctest names."""

import pytest
import sympy
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["sp"] = sympy
