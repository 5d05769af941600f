"""Pure pieces of remote boot: host names, kernel arguments, base URLs, boot file descriptors, scripts."""

from __future__ import annotations

import pytest

from blockprov import boot
from blockprov.errors import InvalidName, UsageError
from blockprov.names import base_url, host_id, kernel_args


def test_host_id_normalises_macs_and_checks_ids() -> None:
    assert host_id("52:54:00:AB:cd:EF") == "52:54:00:ab:cd:ef"
    assert host_id("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    assert host_id("aa-bb-cc-dd-ee-ff") == "aa:bb:cc:dd:ee:ff"  # a dash MAC is a MAC, not a host id
    assert host_id("kiosk-7") == "kiosk-7" and host_id("aabbccddeeff") == "aabbccddeeff"
    for bad in ("52:54-00:ab:cd:ef", "52:54:00:ab:cd", "52:54:00:ab:cd:eg", "Kiosk", "-a", "a_b", "a" * 64, "",
                "a/b", "a\nb"):
        with pytest.raises(InvalidName):
            host_id(bad)


def test_kernel_args_and_base_url_refuse_what_ipxe_would_interpret() -> None:
    assert kernel_args("  console=ttyS0,115200n8   root=/dev/vda1 rw ") == "console=ttyS0,115200n8 root=/dev/vda1 rw"
    for bad in ("a\nb", "x=${net0/mac}", "a || shell", "a && b", "#c", "'q'", "a;b", "x" * 3000):
        with pytest.raises(InvalidName):
            kernel_args(bad)
    assert base_url("http://10.0.2.2:8420/") == "http://10.0.2.2:8420"
    assert base_url("https://[::1]:8443/bp") == "https://[::1]:8443/bp"
    for bad in ("ftp://x", "http://u:p@x", "http://x/?a=1", "http://x y", "http://x/\nshell", "x"):
        with pytest.raises(InvalidName):
            base_url(bad)


def test_split_descriptor_and_id() -> None:
    got: list[tuple[bytes, bytes]] = []
    data = bytes(range(256)) * (boot.PIECE // 128 + 3)  # two full pieces and a short one
    f = boot.split(data, "kernel", got.extend)
    assert f.size == len(data) and f.count == 3 and [c for c, _ in got] == f.piece_ids()
    assert b"".join(boot.assemble(f, [b for _, b in got])) == data
    assert boot.BootFile.from_dict(f.to_dict()) == f
    g = boot.split(data[:-1], "kernel", lambda _: None)
    assert g.id != f.id
    with pytest.raises(UsageError):
        boot.BootFile.from_dict(f.to_dict() | {"size": f.size + boot.PIECE})
    with pytest.raises(UsageError):
        boot.split(b"", "initrd", lambda _: None)


def test_script_and_parse() -> None:
    text = boot.script(host="pc1", assigned="lab:v1", image="lab", version="0123456789abcdef",
                       base="http://r:1", cmdline="console=ttyS0", args="")
    assert text.startswith("#!ipxe\n") and text.endswith("boot\n")
    s = boot.parse_script(text)
    assert s["kernel"] == "http://r:1/v1/images/lab/versions/0123456789abcdef/boot/kernel"
    assert s["args"] == ["console=ttyS0", "blockprov.repo=http://r:1", "blockprov.image=lab@0123456789abcdef",
                         "blockprov.host=pc1", "initrd=initrd.img"]
    with pytest.raises(UsageError):
        boot.parse_script("#!ipxe\nboot\n")


def test_host_settings_are_fields_not_words() -> None:
    """Issue 27 item 1: setting words typed into the arguments are taken out as the host's
    settings; a boot script carries the settings after the arguments."""
    assert boot.split_settings("quiet blockprov.policy=restore rw blockprov.hydrate=off") == (
        "quiet rw", {"policy": "restore", "hydrate": "off"})
    assert boot.split_settings("blockprov.policy=keep blockprov.policy=keep") == ("", {"policy": "keep"})
    assert boot.split_settings("blockprov.policyx=1 blockprov.policy") == ("blockprov.policyx=1 blockprov.policy", {})
    for bad, why in (("blockprov.policy=keep blockprov.policy=restore", "given twice"),
                     ("blockprov.policy=wipe", "one of"), ("blockprov.hydrate=", "a value")):
        with pytest.raises(UsageError, match=why):
            boot.split_settings(bad)
    with pytest.raises(InvalidName):
        boot.split_settings("blockprov.policy=keep\nshell")
    assert boot.host_setting("policy", "") is None and boot.host_setting("hydrate", None) is None
    with pytest.raises(UsageError, match="no setting"):
        boot.host_setting("colour", "red")
    text = boot.script(host="pc1", assigned="lab:v1", image="lab", version="0" * 16, base="http://r", cmdline="c=1",
                       args="a=1", settings={"policy": "restore", "hydrate": None})
    s = boot.parse_script(text)
    assert s["args"][:3] == ["c=1", "a=1", "blockprov.policy=restore"] and "blockprov.hydrate" not in s["params"]
