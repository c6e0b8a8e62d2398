"""The `xenlab config` commands, run through the real entry point."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from tests.aio import sync
from tests.clirun import run_cli as run
from tests.test_files_safety import deadline

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


# -- hostile paths: a FIFO read, a device node written -------------------------------------------


def test_check_of_a_fifo_without_a_writer_ends(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    # open() on a FIFO waits for a writer: this command hung forever.
    fifo = tmp_path / "nobody-writes.cfg"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with deadline(10):
        code, out, err = run(capsys, "config", "check", str(fifo))
    assert time.perf_counter() - t0 < 5
    assert (code, out) == (1, "") and err == (
        f"{fifo}: no data for 3 s at +0x0 (a FIFO without a writer, or a terminal?): save the "
        "config to a file first\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_from_xm_to_a_char_device_node_is_refused(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    # The rename replaced the node with a regular file (as root, -o /dev/full destroyed it).
    xm = tmp_path / "x.cfg"
    xm.write_text("memory = 256\nname = 'vm'\non_crash = 'destroy'\n")
    node = tmp_path / "full"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # /dev/full's numbers, not it
    link = tmp_path / "link.cfg"
    link.symlink_to(node.name)
    for out in (node, link):
        code, text, err = run(capsys, "config", "from-xm", str(xm), "-o", str(out))
        assert (code, text) == (1, "") and err == (
            f"{out}: cannot write: is a character device, not a regular file (only files are "
            "replaced)\n")
        assert stat.S_ISCHR(os.lstat(node).st_mode) and os.lstat(node).st_rdev == os.makedev(1, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "link.cfg", "x.cfg"]


def test_fmt_w_and_from_xm_refuse_a_fifo_and_a_dangling_link(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    xm = tmp_path / "x.cfg"
    xm.write_text("memory = 256\nname = 'vm'\non_crash = 'destroy'\n")
    fifo = tmp_path / "fifo.cfg"
    os.mkfifo(fifo)
    with deadline(10):
        code, _, err = run(capsys, "config", "from-xm", str(xm), "-o", str(fifo))
    assert code == 1 and err == (f"{fifo}: cannot write: is a FIFO, not a regular file (only "
                                 "files are replaced)\n")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    dangling = tmp_path / "d.cfg"
    dangling.symlink_to(tmp_path / "made.cfg")
    code, _, err = run(capsys, "config", "from-xm", str(xm), "-o", str(dangling))
    assert code == 1 and err == (f"{dangling}: cannot write: a dangling symlink (to "
                                 f"'{tmp_path}/made.cfg'); not created through it\n")
    assert not (tmp_path / "made.cfg").exists()


def test_check_names_a_disk_backed_by_a_host_file(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    """A qcow2 over /etc/shadow passed `config check` without a word."""
    from xenlab.vm import qemuimg

    sync(qemuimg.create(tmp_path / "x.qcow2", "qcow2", backing="/etc/shadow", backing_fmt="raw"))
    sync(qemuimg.create(tmp_path / "ok.qcow2", "qcow2", "1M"))
    cfg = tmp_path / "x.cfg"
    cfg.write_text('name = "x"\ntype = "hvm"\nmemory = 64\n'
                   'disk = [ "format=qcow2,vdev=xvda,access=rw,target=x.qcow2", '
                   '"format=qcow2,vdev=xvdb,access=rw,target=ok.qcow2", '
                   '"format=qcow2,vdev=xvdc,access=rw,target=missing.qcow2" ]\n')
    code, out, err = run(capsys, "config", "check", str(cfg))
    assert code == 1 and "ok" not in out
    assert err.count("\n") == 1
    assert f"{cfg}: disk xvda: " in err and "names backing file /etc/shadow" in err
