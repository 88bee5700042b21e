"""The decode kernels' speed choice: one measurement on a busy machine must not turn them off for good."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer.engine import decode_choice
from trainer.engine.decode_choice import CHOICE_FILE, DecodeChoice, measure, recorded, stale


def _here() -> str:
    return decode_choice._setting(decode_choice._probe_env())


def test_a_choice_measured_on_a_busy_machine_keeps_the_kernels_and_is_measured_again_when_calm() -> None:
    """The figures of a CI run at load 5 on 2 cores: the kernels lost, 2.4 against 7.6 tokens/s."""
    hour_ago = time.time() - 3700
    busy = DecodeChoice(
        kernel_tok_s=2.4, mlx_tok_s=7.6, measured_under=_here(), load_per_core=2.5, measured_at=hour_ago
    )
    assert busy.provisional and busy.use_kernel
    assert not stale(busy, busy_now=True)  # a busy machine keeps it rather than measure under load again
    assert stale(busy, busy_now=False)
    just_now = busy.model_copy(update={"measured_at": time.time()})
    assert not stale(just_now, busy_now=False)  # a server start: not again within the hour
    assert stale(just_now, busy_now=False, recheck_after_s=0)  # the set-up's build command: measured again
    calm = DecodeChoice(kernel_tok_s=5.0, mlx_tok_s=10.0, measured_under=_here(), load_per_core=0.3)
    assert not calm.provisional and not calm.use_kernel  # a calm verdict stands (issue 13's Xeon)
    assert not stale(calm, busy_now=False)
    assert stale(calm.model_copy(update={"measured_under": "other libraries"}), busy_now=True)
    old = DecodeChoice.model_validate_json('{"kernel_tok_s": 5.0, "mlx_tok_s": 10.0}')  # recorded before this field
    assert old.load_per_core is None and not old.use_kernel and stale(old, busy_now=False)


def test_where_the_kernels_lose_both_ways_are_probed_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The probes (fresh processes that decode) are the seam here: the first kernel probe is slowed by a moment's
    load; the second pair decides, each way at its best."""
    figures = {True: [2.0, 9.0], False: [8.0, 7.0]}
    monkeypatch.setattr(decode_choice, "_probe", lambda kernel: figures[kernel].pop(0))
    monkeypatch.setattr(decode_choice, "load_per_core", lambda: 0.4)
    choice = measure(tmp_path)
    assert (choice.kernel_tok_s, choice.mlx_tok_s, choice.use_kernel) == (9.0, 8.0, True)
    assert recorded(tmp_path) == choice and (tmp_path / CHOICE_FILE).is_file()
    assert choice.load_per_core == 0.4 and choice.measured_at is not None and not stale(choice, busy_now=False)
    faster = {True: [12.0], False: [8.0]}  # the kernels win at once: one probe each
    monkeypatch.setattr(decode_choice, "_probe", lambda kernel: faster[kernel].pop(0))
    assert measure(tmp_path).kernel_tok_s == 12.0 and faster == {True: [], False: []}
