"""Cinder mode: Mount (attach to a mounted volume) against Nova's attach alone."""

from __future__ import annotations

from bench.harness import Env
from bench.model import CaseResult


def cinder_case(env: Env, smoke: bool, skip: bool = False) -> list[CaseResult]:
    result = CaseResult("cinder", "Cinder mode: Mount (attach-to-mounted)", "s",
                        "Nova attach alone (devcloud)")  # fmt: skip
    result.not_run = "left out (--no-cinder)" if skip else "not implemented yet"
    return [result]
