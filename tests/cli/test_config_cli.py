"""The `xenlab config` commands, run through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run_cli as run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"




def test_check_ok_and_bad(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nmemory = \nvcpus = 2\n')
    code, out, err = run(capsys, "config", "check", str(EXAMPLES / "pv-guest.cfg"), str(bad))
    assert code == 1
    assert "pv-guest.cfg: ok" in out
    assert f"{bad}:2:10: syntax error" in err


def test_check_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    xm = tmp_path / "xm.cfg"
    xm.write_text("memory = 64 + 2\n")
    code, out, _ = run(capsys, "config", "check", "--json", str(xm))
    assert code == 1
    (result,) = json.loads(out)
    assert result["ok"] is False and result["likely_python"] is True
    assert result["errors"][0].startswith(f"{xm}:1:13: ")


def test_check_warns_about_unknown_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "g.cfg"
    cfg.write_text('name = "g"\nkernel = "/k"\nmemroy = 512\n')
    code, out, err = run(capsys, "config", "check", str(cfg))
    assert code == 0 and "ok" in out
    assert f"{cfg}:3: warning:" in err and "memroy" in err


def test_json_typed_and_raw(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "json", str(EXAMPLES / "hvm-vnuma.cfg"))
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "hvm-vnuma" and data["type"] == "hvm"
    assert data["memory_mib"] == 2048 and len(data["vnuma"]) == 2
    code, out, _ = run(capsys, "config", "json", "--raw", str(EXAMPLES / "hvm-vnuma.cfg"))
    raw = json.loads(out)
    assert raw["memory"] == "2048"
    assert raw["vnuma"][1] == ["pnode=1", "size=1024", "vcpus=2-3", "vdistances=20,10"]


def test_show_renders_tables(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "show", str(EXAMPLES / "hvm-vnuma.cfg"))
    assert code == 0
    assert "hvm-vnuma" in out and "disks" in out and "/srv/install.iso" in out


def test_fmt_prints_and_rewrites_atomically(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "g.cfg"
    cfg.write_text("# c\nname='g' ; memory=0x100\nname += '2'\n")
    code, out, _ = run(capsys, "config", "fmt", str(cfg))
    assert code == 0 and out == 'name = "g2"\nmemory = 0x100\n'
    code, _, _ = run(capsys, "config", "fmt", "-w", str(cfg))
    assert cfg.read_text() == out
    assert [p.name for p in tmp_path.iterdir()] == ["g.cfg"]  # no temp file left


def test_fmt_on_bad_file_leaves_it_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "g.cfg"
    cfg.write_text("name = (\n")
    code, _, err = run(capsys, "config", "fmt", "-w", str(cfg))
    assert code == 1 and f"{cfg}:1:8:" in err
    assert cfg.read_text() == "name = (\n"


def test_disk_vif_pci(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "disk", "/dev/vg/guest,raw,xvda,rw")
    assert code == 0
    disk = json.loads(out)
    assert disk["pdev_path"] == "/dev/vg/guest" and disk["vdev"] == "xvda"
    assert disk["format"] == "raw" and disk["readwrite"] == 1
    code, out, _ = run(capsys, "config", "vif", "mac=00:16:3e:01:02:03,bridge=br0")
    vif = json.loads(out)
    assert vif["mac"] == "00:16:3e:01:02:03" and vif["bridge"] == "br0"
    code, out, _ = run(capsys, "config", "pci", "0000:03:00.1@5,permissive=1")
    pci = json.loads(out)
    # libxl's JSON leaves out fields at their default (dev 0 here).
    assert (pci["bus"], pci.get("dev"), pci["func"]) == (3, None, 1)
    assert pci["permissive"] is True and pci["vdevfn"] == 5 << 3


def test_disk_error_has_place(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "config", "disk", "/x,raw,xvda,rw,extra")
    assert code == 1 and err.startswith("disk spec:1:")


def test_from_xm(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    xm = tmp_path / "old.cfg"
    xm.write_text("builder = 'hvm'\nmemory = 64 * 4\nname = 'vm' + '1'\nacpi = True\n")
    out_file = tmp_path / "new.cfg"
    code, _, _ = run(capsys, "config", "from-xm", str(xm), "-o", str(out_file))
    assert code == 0
    code, out, _ = run(capsys, "config", "json", "--raw", str(out_file))
    raw = json.loads(out)
    assert raw["type"] == "hvm" and raw["memory"] == "256"
    assert raw["name"] == "vm1" and raw["acpi"] == "1"


def test_from_xm_refuses_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    xm = tmp_path / "old.cfg"
    xm.write_text("import os\nname = os.uname()[1]\n")
    code, _, err = run(capsys, "config", "from-xm", str(xm))
    assert code == 1 and f"{xm}:1:1:" in err
