"""Hub failures become one line naming what to do (issue 6). No network: offline mode is real
(HF_HUB_OFFLINE=1 with an empty cache); the online failures are the real huggingface_hub exception
classes, built by huggingface_hub's own ``hf_raise_for_status`` from a Hub-shaped HTTP response."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.utils import hf_raise_for_status

from csulora.errors import CsuloraError
from csulora.io.checkpoints import _hub_errors, parse_ref
from csulora.synthetic import write_adapter, write_pair
from tests.conftest import assert_one_line_error, run_cli

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16)}


def hub_error(status: int, code: str | None, repo: str = "org/model", revision: str = "main") -> Exception:
    """The exception huggingface_hub raises for this Hub response (X-Error-Code header as the Hub sends it)."""
    url = f"https://huggingface.co/{repo}/resolve/{revision}/model.safetensors.index.json"
    headers = {"X-Error-Code": code} if code else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as e:  # noqa: BLE001 - returned to be raised by the fake hub function
        return e
    raise AssertionError("hf_raise_for_status did not raise")


CASES = {
    "unknown repo": (lambda: hub_error(404, "RepoNotFound"), "RepositoryNotFoundError", ["not found", "check the id"]),
    "gated without token": (lambda: hub_error(403, "GatedRepo"), "GatedRepoError", ["gated", "HF_TOKEN"]),
    "missing revision": (lambda: hub_error(404, "RevisionNotFound", revision="v9"), "RevisionNotFoundError",
                         ["revision not found", "after '@'"]),
    "server error": (lambda: hub_error(503, None), "HfHubHTTPError", ["Hub request failed", "retry"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_hub_failure_is_one_line(case, monkeypatch, tmp_path):
    import huggingface_hub

    make, cls_name, words = CASES[case]
    assert type(make()).__name__ == cls_name  # the real class, as the Hub would produce it

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    pair = write_pair(tmp_path / "pair", SHAPES)
    adapter = write_adapter(tmp_path / "adapter", SHAPES)
    aligned = "org/model@v9" if case == "missing revision" else "org/model"
    result = run_cli("sanitize", "--adapter", adapter, "--aligned", aligned, "--base", pair["base"],
                     "-o", tmp_path / "out", "-q", in_process=True)  # fmt: skip
    assert_one_line_error(result, aligned, *words)
    assert not (tmp_path / "out").exists()


def test_hub_errors_maps_each_class():
    """Subclasses first: GatedRepoError is a RepositoryNotFoundError, which is an HfHubHTTPError."""
    ref = parse_ref("org/model@v1")
    for make, _, words in CASES.values():
        with pytest.raises(CsuloraError) as info, _hub_errors(ref):
            raise make()
        assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)


def test_offline_without_cache_is_one_line(tmp_path):
    """Real huggingface_hub in offline mode with an empty cache: nothing to download from, nothing cached."""
    pair = write_pair(tmp_path / "pair", SHAPES)
    adapter = write_adapter(tmp_path / "adapter", SHAPES)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    result = run_cli("sanitize", "--adapter", str(adapter), "--aligned", "org/not-cached", "--base",
                     str(pair["base"]), "-o", str(tmp_path / "out"), "-q", env=env)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "org/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "download it first" in lines[0]
    assert not (tmp_path / "out").exists()
