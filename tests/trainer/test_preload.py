"""OpenBLAS and tcmalloc reach the workers' LD_PRELOAD when installed, can be turned off, and are named when missing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from trainer.environment import preload


@pytest.mark.skipif(sys.platform != "linux", reason="preloading applies to Linux only")
def test_workers_get_every_installed_library_preloaded_once() -> None:
    env = preload.preload_env({"LD_PRELOAD": "/x.so"})
    found = [str(p) for p in (preload.find(lib) for lib in preload.LIBRARIES) if p is not None]
    assert env["LD_PRELOAD"] == ":".join([*found, "/x.so"])
    assert preload.preload_env(env) == env  # idempotent: already preloaded, nothing added twice


@pytest.mark.skipif(sys.platform != "linux", reason="preloading applies to Linux only")
def test_a_library_can_be_turned_off_or_pointed_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert preload.find(preload.TCMALLOC, {preload.TCMALLOC.env: "off"}) is None
    assert "tcmalloc" not in preload.preload_env({preload.TCMALLOC.env: "off"}).get("LD_PRELOAD", "")
    monkeypatch.setenv(preload.TCMALLOC.env, "off")
    assert preload.find(preload.TCMALLOC) is None  # the process's own environment by default
    own = tmp_path / "libmymalloc.so"
    own.write_bytes(b"")
    assert str(own) in preload.preload_env({preload.TCMALLOC.env: str(own)})["LD_PRELOAD"].split(":")
    monkeypatch.setenv(preload.TCMALLOC.env, str(tmp_path / "missing.so"))
    assert preload.find(preload.TCMALLOC) is None


@pytest.mark.skipif(sys.platform != "linux", reason="preloading applies to Linux only")
def test_a_missing_library_is_named_once_with_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(preload, "_warned", set())
    env = {preload.TCMALLOC.env: str(tmp_path / "missing.so")}
    with caplog.at_level(logging.WARNING, logger=preload.log.name):
        preload.preload_env(env)
        preload.preload_env(env)
    warnings = [r.getMessage() for r in caplog.records if "tcmalloc" in r.getMessage()]
    assert len(warnings) == 1
    assert "libtcmalloc-minimal4" in warnings[0] and preload.TCMALLOC.env in warnings[0]


@pytest.mark.skipif(sys.platform != "linux", reason="preloading applies to Linux only")
def test_an_openblas_core_type_older_than_the_cpu_is_named_never_overridden(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    avx512 = tmp_path / "cpuinfo-avx512"
    avx512.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512dq avx512bw avx512vl avx512cd\n")
    avx2 = tmp_path / "cpuinfo-avx2"
    avx2.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n")
    blas = tmp_path / "libblas.so.3"
    blas.write_bytes(b"")
    env = {preload.OPENBLAS.env: str(blas), preload.OPENBLAS_CORE_ENV: "Haswell"}
    assert preload.openblas_core_held_back(env, avx512)
    assert not preload.openblas_core_held_back(env, avx2)
    assert not preload.openblas_core_held_back({**env, preload.OPENBLAS_CORE_ENV: "SkylakeX"}, avx512)
    assert not preload.openblas_core_held_back({preload.OPENBLAS.env: str(blas)}, avx512)
    monkeypatch.setattr(preload, "_warned", set())
    monkeypatch.setattr(preload, "openblas_core_held_back", lambda env: "SkylakeX")
    with caplog.at_level(logging.WARNING, logger=preload.log.name):
        out = preload.preload_env(env)
    assert out[preload.OPENBLAS_CORE_ENV] == "Haswell"  # the user's setting stands
    assert any("OPENBLAS_CORETYPE=Haswell" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("corename", "flags", "expected"),
    [
        ("Prescott", "avx2 fma avx512f avx512dq avx512bw avx512vl avx512cd", "SkylakeX"),  # a CPU OpenBLAS doesn't know
        ("Haswell", "avx2 fma avx512f avx512dq avx512bw avx512vl avx512cd", "SkylakeX"),
        ("Cooperlake", "avx2 fma avx512f avx512dq avx512bw avx512vl avx512cd", None),  # it chose well
        ("Prescott", "avx2 fma", "Haswell"),
        ("Zen", "avx2 fma", None),
        ("Prescott", "sse2 sse4_2", None),  # nothing better to ask for
    ],
)
def test_the_better_core_is_the_cpus_widest_vectors(corename: str, flags: str, expected: str | None) -> None:
    from trainer.environment.blas_core import better_core

    assert better_core(corename, frozenset(flags.split())) == expected


@pytest.mark.skipif(preload.find(preload.OPENBLAS) is None, reason="OpenBLAS is not installed here")
def test_the_probe_reads_the_kernels_openblas_really_runs() -> None:
    from trainer.environment.blas_core import probe_corename

    library = str(preload.find(preload.OPENBLAS))
    assert probe_corename(library, "Prescott") == "Prescott"  # what a CPU unknown to OpenBLAS gets
    assert probe_corename(library)  # and what it picks here by itself


@pytest.mark.skipif(sys.platform != "linux", reason="preloading applies to Linux only")
def test_generic_openblas_kernels_are_replaced_once_and_a_users_choice_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.environment import blas_core

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 fma avx512f avx512dq avx512bw avx512vl avx512cd\n")
    blas = tmp_path / "libopenblas.so.0"
    blas.write_bytes(b"")
    monkeypatch.setattr(blas_core, "CPUINFO", cpuinfo)
    monkeypatch.setattr(preload, "probe_corename", lambda library: "Prescott")  # as on a CPU newer than OpenBLAS
    monkeypatch.setattr(preload, "_warned", set())
    env = {preload.OPENBLAS.env: str(blas), preload.TCMALLOC.env: "off"}
    with caplog.at_level(logging.WARNING, logger=preload.log.name):
        first, second = preload.preload_env(dict(env)), preload.preload_env(dict(env))
    assert first[preload.OPENBLAS_CORE_ENV] == second[preload.OPENBLAS_CORE_ENV] == "SkylakeX"
    said = [r.getMessage() for r in caplog.records if "kernels" in r.getMessage()]
    assert len(said) == 1 and "Prescott" in said[0] and "SkylakeX" in said[0]
    users = preload.preload_env({**env, preload.OPENBLAS_CORE_ENV: "Prescott"})
    assert users[preload.OPENBLAS_CORE_ENV] == "Prescott"  # the user's setting stands (and is warned about)
