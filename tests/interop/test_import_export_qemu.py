"""Round trips checked by qemu-img, the reference reader: raw, qcow2, vmdk, vhdx, sparse."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx"])
def test_roundtrip_formats(tmp_path: Path, fmt: str) -> None:
    raw = make_image(tmp_path / "src.raw", 24 << 20, seed=7)
    src = raw
    if fmt != "raw":
        src = tmp_path / f"src.{fmt}"
        qemu_img("convert", "-O", fmt, str(raw), str(src))
    data = tmp_path / "data"
    out = json.loads(run_cli("import", str(src), f"rt-{fmt}:v1", "--json", data=data).stdout)
    assert out["source_bytes"] == 24 << 20
    run_cli("export", f"rt-{fmt}:v1", str(tmp_path / "out.raw"), data=data)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(raw), str(tmp_path / "out.raw"))
    run_cli("export", f"rt-{fmt}:v1", str(tmp_path / "out.qcow2"), "--format", "qcow2", data=data)
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "out.qcow2")).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 24 << 20
    qemu_img("compare", str(raw), str(tmp_path / "out.qcow2"))


def test_sparse_image_costs_nothing_for_holes(tmp_path: Path) -> None:
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, almost all hole
        f.seek(512 << 20)
        f.write(b"data" * 4096)
    data = tmp_path / "data"
    out = json.loads(run_cli("import", str(src), "sparse:v1", "--json", data=data).stdout)
    assert out["bytes_read"] < 2 << 20
    assert out["new_chunks"] == 1
    assert out["zero_chunks"] == out["chunks"] - 1
    run_cli("export", "sparse:v1", str(tmp_path / "out.raw"), data=data)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(src), str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").stat().st_blocks * 512 < 4 << 20  # the export stays sparse


def test_cli_reads_json_everywhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = make_image(tmp_path / "a.raw", 4 << 20, seed=8)
    run_cli("import", str(src), "j:v1", data=data)
    images = json.loads(run_cli("images", "--json", data=data).stdout)
    assert images[0]["name"] == "j" and "v1" in images[0]["tags"]
    show = json.loads(run_cli("show", "j:v1", "--json", data=data).stdout)
    assert show["size"] == 4 << 20 and show["raw_url"] is None
    vid = show["id"]
    run_cli("tag", f"j@{vid}", "j:prod", data=data)
    assert json.loads(run_cli("show", "j:prod", "--json", data=data).stdout)["id"] == vid
    versions = json.loads(run_cli("versions", "j", "--json", data=data).stdout)
    assert versions[0]["tags"] == ["prod", "v1"]
    diff = json.loads(run_cli("diff", "j:v1", "j:prod", "--json", data=data).stdout)
    assert diff["changed"] == []
    run_cli("rm", "j:prod", data=data)
    assert run_cli("show", "j:prod", data=data, check=False).returncode == 3
    gc = json.loads(run_cli("gc", "--json", data=data).stdout)
    assert gc["chunks_removed"] == 0


@pytest.mark.parametrize("args,code,needle", [
    (["import", "/nonexistent.img", "x:v"], 6, "no such file"),
    (["import", "{src}", "Bad/Name:v"], 2, "invalid image name"),
    (["import", "{src}", "x@0123456789abcdef"], 2, "NAME:TAG"),
    (["import", "{src}", "x:v", "--chunk-size", "3000"], 2, "power of two"),
    (["import", "{notimage}", "x:v", "--format", "qcow2"], 6, "cannot read"),
    (["show", "nothere:v"], 3, "no such image"),
    (["export", "nothere:v", "{tmp}/o"], 3, "no such image"),
    (["--repo", "http://127.0.0.1:9", "images"], 7, "unreachable"),
    (["--repo", "ftp://x", "images"], 2, "http"),
])
def test_bad_input_clear_errors(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    src = make_image(tmp_path / "a.raw", 1 << 20, seed=9)
    notimage = tmp_path / "text.txt"
    notimage.write_text("hello")
    args = [a.format(src=src, notimage=notimage, tmp=tmp_path) for a in args]
    (tmp_path / "data").mkdir()  # an empty repository (a --data that does not exist is its own error: exit 3)
    p = run_cli(*args, data=tmp_path / "data", check=False)
    assert p.returncode == code, p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
