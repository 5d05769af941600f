"""CLI commands for machines: ``boot-files``, ``host`` and ``agents``.

``register(cli)`` (called by cli/__init__.py) attaches them. Errors are mapped to messages and
exit codes by the group's edge in cli/__init__.py, like every other command's.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any

import click

from blockprov import humanize as hz
from blockprov.boot import (
    DEBIAN_EFI,
    DEBIAN_EFI_PACKAGES,
    EFI_FILES,
    HYDRATE,
    POLICIES,
    efi_missing,
    parse_script,
    stranded,
)
from blockprov.catalog.records import BootFilesInfo, HostInfo
from blockprov.cli._common import Ctx, check_creatable, emit, json_option, run_async
from blockprov.errors import BlockprovError, HostNotFound, SiteNotFound, UsageError
from blockprov.names import host_id, parse_ref
from blockprov.results import to_dict


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _ago(s: float) -> str:
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


# -- boot files -------------------------------------------------------------------------------------
EFI_HELP = ("The UEFI loader stored with the boot files (a UEFI PC's HTTP boot and its disk's own loader, "
            "Secure Boot included): 'debian' (the default) takes Debian's signed shim, GRUB and MOK manager "
            f"from this machine ({DEBIAN_EFI_PACKAGES}; left out, saying so, when they are not installed); "
            f"'none' stores none; a directory gives {', '.join(EFI_FILES)} (the last optional), e.g. signed "
            "with your own key.")


def efi_sources(spec: str) -> tuple[dict[str, Path], str | None]:
    """The EFI loader files ``--efi`` names, and a note when the default finds none."""
    if spec == "none":
        return {}, None
    if spec == "debian":
        found = {name: Path(p) for name, p in DEBIAN_EFI.items() if Path(p).is_file()}
        if efi_missing(found):
            return {}, (f"no UEFI loader stored: {', '.join(DEBIAN_EFI[n] for n in efi_missing(found))} missing "
                        f"(apt-get install {DEBIAN_EFI_PACKAGES}); UEFI PCs boot this version through iPXE only")
        return found, None
    where = Path(spec)
    if not where.is_dir():
        raise UsageError(f"--efi {spec}: expected debian, none or a directory holding {', '.join(EFI_FILES)}")
    found = {name: where / name for name in EFI_FILES if (where / name).is_file()}
    if missing := efi_missing(found):
        raise UsageError(f"--efi {spec}: {', '.join(missing)} missing there")
    return found, None


prepare_option = click.option(
    "--prepare/--no-prepare", default=True, show_default=True, envvar="BLOCKPROV_PREPARE",
    help="Prepare the version's boot profile in the background on the repository's host (one headless "
         "boot) unless it has or inherits one, so its first machine boots warm.")


def _prepared(obj: Ctx, image: str, vid: str, prepare: bool) -> str | None:
    """Start (embedded repository) or report (a server started it) the preparation of a version's
    boot profile (vm/prepare.py); what to tell the operator."""
    if not prepare:
        return None
    from blockprov.repo.local import LocalRepository

    repo = obj.repo
    if isinstance(repo, LocalRepository):
        from blockprov.vm.prepare import cli_prefix, schedule

        data = Path(repo.data_dir)
        return schedule(repo, image, vid, cli_prefix(data, obj.store, obj.catalog), data / "prepare")
    st = repo.preparation(f"{image}@{vid}")
    if st is None:
        return "this server does not prepare boot profiles (serve --no-prepare); the first boot records one"
    return f"{st['state']}" + (f": {st['detail']}" if st.get("detail") else "")


@click.group("boot-files")
def boot_files() -> None:
    """Kernel, initrd and UEFI loader a host boots a version with (served by `blockprov serve`)."""


@boot_files.command("set")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--kernel", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--initrd", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cmdline", default="", help="Kernel command line for every host booting this version.")
@click.option("--efi", "efi_spec", default="debian", metavar="debian|none|DIR", help=EFI_HELP)
@click.option("--record-profile", is_flag=True,
              help="Then boot the version once headless to record its boot profile (as `profile record`).")
@prepare_option
@json_option
@click.pass_obj
def boot_files_set(obj: Ctx, ref: str, kernel: Path, initrd: Path, cmdline: str, efi_spec: str, record_profile: bool,
                   prepare: bool, as_json: bool) -> None:
    """Store a kernel, an initrd and a UEFI loader for the version REF names (replacing any it had);
    its boot profile is then prepared in the background on the repository's host, unless it has
    one (--no-prepare)."""
    efi, note = efi_sources(efi_spec)
    info = obj.repo.set_boot_files(parse_ref(ref), kernel, initrd, cmdline, efi,
                                   prepare=prepare and not record_profile)
    said = None if record_profile else _prepared(obj, info.image, info.version, prepare)
    recorded = None
    if record_profile:
        from blockprov.vm.record import record  # qemu and the cache load only when asked

        m = obj.repo.resolve(f"{info.image}@{info.version}")
        recorded = to_dict(run_async(record(obj.repo, m)))
    if as_json:
        emit({**to_dict(info), **({"profile": recorded} if recorded else {}), "preparation": said})
        return
    click.echo(f"{info.image}@{info.version}: kernel {hz.size(info.kernel.size)}, initrd {hz.size(info.initrd.size)}"
               f", {_efi_line(info)}, cmdline {info.cmdline or '-'}")
    if note:
        click.echo(f"note: {note}", err=True)
    if said:
        click.echo(f"boot profile: {said}")
    if recorded:
        click.echo(f"recorded a boot profile of {recorded['chunks']} chunk(s) in {recorded['seconds']:.0f} s "
                   f"(ended: {recorded['ended']})")


@boot_files.command("build")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel to boot (default: the newest /boot/vmlinuz-* with its modules installed).")
@click.option("--modules", "modules_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The kernel's module tree, holding modules.dep (default: /lib/modules/RELEASE).")
@click.option("--cmdline", default=None,
              help="Kernel command line for every host booting this version (default: consoles tty0 and ttyS0).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the initramfs to this file.")
@click.option("--efi", "efi_spec", default="debian", metavar="debian|none|DIR", help=EFI_HELP)
@prepare_option
@json_option
@click.pass_obj
def boot_files_build(obj: Ctx, ref: str, kernel: Path | None, modules_dir: Path | None, cmdline: str | None,
                     output: Path | None, efi_spec: str, prepare: bool, as_json: bool) -> None:
    """Build the blockprov initramfs (the in-machine agent: a PC boots REF from the network onto its own
    disk) for a kernel, and store kernel, initramfs and UEFI loader as REF's boot files."""
    from blockprov.netboot import initramfs

    # What fails fast fails first: the repository and the version (a build takes 10-30 s), the output
    # path; the kernel's format and its modules are checked by build() before its long part.
    m = obj.repo.resolve(parse_ref(ref))
    efi, note = efi_sources(efi_spec)
    if output is not None:
        check_creatable(output, "file")
    show = not as_json and sys.stderr.isatty()

    def step(what: str) -> None:
        if show:
            click.echo(f"\rboot-files build: {what}…"[:100].ljust(100), err=True, nl=False)
    built = initramfs.build(kernel, modules_dir, progress=step)
    if show:
        click.echo("\r" + " " * 100 + "\r", err=True, nl=False)
    if output is not None:
        output.write_bytes(built.data)
    cmd = initramfs.DEFAULT_CMDLINE if cmdline is None else cmdline
    info = obj.repo.set_boot_files(parse_ref(f"{m.image}@{m.id}"), built.kernel, built.data, cmd, efi,
                                   prepare=prepare)
    if note:
        click.echo(f"note: {note}", err=True)
    said = _prepared(obj, info.image, info.version, prepare)
    if as_json:
        emit(to_dict(info) | {"build": built.summary(), "preparation": said})
        return
    click.echo(f"{info.image}@{info.version}: kernel {built.release} {hz.size(info.kernel.size)}, blockprov "
               f"initramfs {hz.size(len(built.data))} ({hz.size(built.unpacked)} unpacked, {built.files} files, "
               f"{built.python_modules} python modules, {len(built.modules)} kernel modules), {_efi_line(info)}, "
               f"cmdline {cmd or '-'}")
    if said:
        click.echo(f"boot profile: {said}")


@boot_files.command("show")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@json_option
@click.pass_obj
def boot_files_show(obj: Ctx, ref: str, as_json: bool) -> None:
    """Show a version's boot files."""
    info = obj.repo.get_boot_files(parse_ref(ref))
    if as_json:
        emit(info)
        return
    if info is None:
        click.echo(f"{ref} has no boot files (set them with: blockprov boot-files set {ref} --kernel F --initrd F)")
        return
    click.echo(f"{info.image}@{info.version}  (set {_when(info.updated)})")
    for name, f in (("kernel", info.kernel), ("initrd", info.initrd), *sorted(info.efi.items())):
        click.echo(f"  {name:11} {hz.size(f.size):>10}  {f.size} bytes, id {f.id}")
    if not info.efi:
        click.echo("  (no UEFI loader: UEFI PCs boot this version through iPXE only)")
    click.echo(f"  cmdline     {info.cmdline or '-'}")


def _efi_line(info: BootFilesInfo) -> str:
    if not info.efi:
        return "no UEFI loader"
    return "UEFI loader " + " + ".join(f"{n} {hz.size(f.size)}" for n, f in sorted(info.efi.items()))


# -- hosts ------------------------------------------------------------------------------------------
@click.group("host")
def host() -> None:
    """Which version each host (MAC address or host id) boots over the network."""


@host.command("assign")
@click.argument("host_name", metavar="HOST")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--args", "args", default=None,
              help="Extra kernel arguments for this host, replacing its earlier ones (default: kept as they "
                   "are; --args '' clears them).")
@click.option("--policy", type=click.Choice(POLICIES),
              help="For a machine booting blockprov's initramfs (boot-files build): restore = reboot-to-restore "
                   "(the last session's changes are undone at boot), keep = the disk keeps them (its default). "
                   "Kept until changed; carried in the boot script as blockprov.policy.")
@click.option("--hydrate", type=click.Choice(HYDRATE),
              help="For blockprov's initramfs: copy the rest of the image to the disk in the background "
                   "(its default), all of it before the boot, or never ahead. Kept until changed; kernel "
                   "argument blockprov.hydrate.")
@click.option("--site", default=None, metavar="NAME",
              help="The host's site (blockprov site add): its PC shares chunks with the site's other PCs and boots "
                   "from the site's cache when it has one. Kept until changed; --site '' takes it out.")
@json_option
@click.pass_obj
def host_assign(obj: Ctx, host_name: str, ref: str, args: str | None, policy: str | None, hydrate: str | None,
                site: str | None, as_json: bool) -> None:
    """Boot HOST from REF: NAME:TAG follows the tag when it moves, NAME@ID stays.

    Re-assigning changes only what is named: the host's arguments, policy and hydration stay as
    they were unless given."""
    settings = {k: v for k, v in (("policy", policy), ("hydrate", hydrate), ("site", site)) if v is not None}
    h = obj.repo.assign_host(host_name, parse_ref(ref), args, settings)
    if as_json:
        emit(h)
        return
    click.echo(f"{h.host} → {h.ref} (now {parse_ref(h.ref).name}@{h.version}), {_settings(h)}"
               + (f", args {h.args}" if h.args else ", no extra args"))
    if h.version and obj.repo.get_boot_files(f"{parse_ref(h.ref).name}@{h.version}") is None:
        click.echo(f"warning: {stranded(h.ref, h.version, [h.host])}", err=True)
    small = _keep_token_too_small(obj, h)
    if small:
        click.echo(f"warning: {small}", err=True)


def _keep_token_too_small(obj: Ctx, h: HostInfo) -> str | None:
    """A keep PC keeps its session as a version before it moves to another one (agent/keep.py),
    which needs a write token; with a smaller one it stays on its version. Checked where the
    tokens are (the embedded repository's catalog); a server's tokens are not visible here."""
    words = dict(w.split("=", 1) for w in h.args.split() if "=" in w)
    token = words.get("blockprov.token")
    if (h.policy or "keep") != "keep" or not token or words.get("blockprov.on_move") == "discard" or obj.repo_url:
        return None
    from blockprov.catalog.tokens import TokenStore, allows

    info = TokenStore(obj.repo.catalog.db).lookup(token)  # type: ignore[attr-defined]
    if info is None:
        return f"the token in {h.host}'s arguments is not a valid token of this repository"
    if allows(info.scope, "write"):
        return None
    return (f"{h.host} keeps its changes (policy keep) and its token has the {info.scope} scope: when its version "
            "moves it must keep its session as a version first, which needs a write token, so it will stay on "
            "the version it has (its screen says so); give it a write token, or --args blockprov.on_move=discard "
            "to reset those changes instead")


def _settings(h: HostInfo) -> str:
    """The host's settings as people read them; an unset one shows the machine's default."""
    return (f"policy {h.policy or 'keep (default)'}, "
            f"hydrate {h.hydrate or 'background (default)'}, site {h.site or '-'}")


@host.command("list")
@json_option
@click.pass_obj
def host_list(obj: Ctx, as_json: bool) -> None:
    """List host assignments."""
    hs = obj.repo.hosts()
    if as_json:
        emit(hs)
        return
    if not hs:
        click.echo("no hosts (assign one with: blockprov host assign MAC NAME:TAG)")
        return
    click.echo(f"{'HOST':20} {'ASSIGNED':32} {'BOOTS':18} {'POLICY':8} {'HYDRATE':12} {'SITE':12} {'FIRMWARE':8} "
               f"{'LAST BOOT':34} ARGS")
    for h in hs:
        now = h.version or "GONE: re-assign"
        click.echo(f"{h.host:20} {h.ref:32} {now:18} {h.policy or '-':8} {h.hydrate or '-':12} {h.site or '-':12} "
                   f"{h.firmware or '-':8} "
                   f"{_last_boot(h):34} {h.args}".rstrip())


def _last_boot(h: HostInfo) -> str:
    if h.last_refused is not None and (h.last_boot is None or h.last_refused > h.last_boot):
        return f"REFUSED {_when(h.last_refused)} (host show)"
    if h.last_boot is None:
        return "never booted"
    return f"booted {_when(h.last_boot)} {str(h.last_boot_version or '?')[:12]}"


@host.command("show")
@click.argument("host_name", metavar="HOST")
@json_option
@click.pass_obj
def host_show(obj: Ctx, host_name: str, as_json: bool) -> None:
    """Show one host: its assignment, the version it boots now, and its last boot."""
    wanted = host_id(host_name)
    h = next((x for x in obj.repo.hosts() if x.host == wanted), None)
    if h is None:
        raise HostNotFound(host=wanted)
    if as_json:
        emit(h)
        return
    click.echo(f"host      {h.host}")
    click.echo(f"assigned  {h.ref}  (at {_when(h.updated)})")
    click.echo(f"boots     {h.version or 'GONE: ' + h.ref + ' no longer exists, re-assign it'}")
    click.echo(f"policy    {h.policy or 'keep (the default: not set)'}")
    click.echo(f"hydrate   {h.hydrate or 'background (the default: not set)'}")
    click.echo(f"args      {h.args or '-'}")
    click.echo(f"firmware  {h.firmware or 'not known yet (its boot requests tell: bios or uefi)'}")
    if h.last_boot is None:
        click.echo("last boot never (it has not fetched the whole initrd of its boot script)")
    else:
        click.echo(f"last boot {_when(h.last_boot)} ({_ago(time.time() - h.last_boot)}), version {h.last_boot_version}")
    if h.last_refused is not None:
        click.echo(f"refused   {_when(h.last_refused)} ({_ago(time.time() - h.last_refused)}): {h.refused_why}")


@host.command("prewarm")
@click.argument("target", metavar="SITE|URL")
@click.argument("ref", required=False, metavar="[NAME:TAG]")
@click.option("--at", "when", default="now", show_default=True, metavar="TIME",
              help="When: now, +30m, 08:30 (the next time the clock shows it) or 2026-12-08T08:30.")
@click.option("--all", "everything", is_flag=True, help="After the boot profile's chunks, every other chunk too.")
@click.option("--wait", is_flag=True, help="Wait until the pre-warm is done, showing its progress.")
@json_option
@click.pass_obj
def host_prewarm(obj: Ctx, target: str, ref: str | None, when: str, everything: bool, wait: bool,
                 as_json: bool) -> None:
    """Pull a version's boot working set (its boot profile's chunks first) into a site's cache before
    opening time, so the site's PCs find it on their LAN. TARGET is a site with a site cache (site
    add SITE --cache URL) or the site cache's URL. Without NAME:TAG, list the site cache's pre-warms."""
    from blockprov.humanize import parse_when
    from blockprov.repo.remote import RemoteRepository

    url = target if target.startswith(("http://", "https://")) else _site_cache_of(obj, target)
    cache = RemoteRepository(url, token=obj.token, ca=obj.ca)
    try:
        if ref is None:
            jobs = cache.prewarm_jobs()
            if as_json:
                emit(jobs)
                return
            for j in jobs or []:
                click.echo(_prewarm_line(j))
            if not jobs:
                click.echo(f"no pre-warms at {url}")
            return
        job = cache.prewarm(parse_ref(ref), parse_when(when, time.time()), everything)
        while wait and job["state"] in ("scheduled", "running"):  # bounded by the job, which ends
            time.sleep(2.0)
            job = next((j for j in cache.prewarm_jobs() if j["id"] == job["id"]), job)
            if not as_json:
                click.echo(_prewarm_line(job), err=True)
        if as_json:
            emit(job)
        else:
            click.echo(_prewarm_line(job))
        if job["state"] == "failed":
            raise BlockprovError(f"pre-warm of {ref} at {url} failed: {job['error']}")
    finally:
        cache.close()


def _site_cache_of(obj: Ctx, site: str) -> str:
    for s in obj.repo.sites():
        if s.name == site:
            if not s.cache:
                raise UsageError(f"site {site} has no site cache to pre-warm: give it one with "
                                 f"blockprov site add {site} --cache URL (blockprov serve --upstream …)")
            return s.cache
    raise SiteNotFound(site=site)


def _prewarm_line(j: dict[str, Any]) -> str:
    at = datetime.datetime.fromtimestamp(j["at"]).isoformat(timespec="minutes")
    progress = f"{j.get('done', 0)}/{j['total']} chunks" if j.get("total") is not None else "-"
    return (f"{j['id']}  {j['ref']:24} at {at}  {j['state']:9} {progress}"
            + (f" ({j['profile_chunks']} from its boot profile)" if j.get("profile_chunks") is not None else "")
            + (f"  {j['error']}" if j.get("error") else ""))


@host.command("rm")
@click.argument("host_name", metavar="HOST")
@click.pass_obj
def host_rm(obj: Ctx, host_name: str) -> None:
    """Forget a host's assignment."""
    obj.repo.remove_host(host_name)
    click.echo(f"removed {host_name}")


@host.command("reprovision")
@click.argument("host_name", metavar="HOST")
@json_option
@click.pass_obj
def host_reprovision(obj: Ctx, host_name: str, as_json: bool) -> None:
    """Set HOST's disk up again from scratch at its next boot (a network boot, whatever its disk
    holds: the every-day boot from the disk is not taken until then)."""
    token = obj.repo.reprovision_host(host_name)
    if as_json:
        emit({"host": host_name, "reprovision": token})
    else:
        click.echo(f"{host_name}: its disk is set up again at its next boot (request {token})")


@host.command("script")
@click.argument("host_name", metavar="HOST")
@click.option("--base-url", metavar="URL",
              help="The repository's URL as the host reaches it (default: the --repo URL).")
@json_option
@click.pass_obj
def host_script(obj: Ctx, host_name: str, base_url: str | None, as_json: bool) -> None:
    """Print the iPXE script HOST gets from GET /v1/boot/HOST."""
    if base_url is None and not obj.repo.url.startswith(("http://", "https://")):
        raise UsageError("the embedded repository has no HTTP address: give --base-url URL (where "
                         "`blockprov serve` is reachable from the host) or --repo URL")
    text = obj.repo.boot_script(host_name, base_url)
    if as_json:
        emit({"script": text} | parse_script(text))
    else:
        click.echo(text, nl=False)


# -- agents -----------------------------------------------------------------------------------------
@click.command("agents")
@json_option
@click.pass_obj
def agents(obj: Ctx, as_json: bool) -> None:
    """Agents registered with the repository, and their queued requests.

    Each is online (seen within 30 s) or OFFLINE (its last report); one not seen for 7 days is
    forgotten (it registers again when it starts). Host agents (`attach`) show the version they
    serve (a PC its last move to another version); `clones serve` and `pool serve` agents their
    clones and pools (ready, in use, target size, last refill error)."""
    rows = obj.repo.agents()
    if as_json:
        emit(rows)
        return
    if not rows:
        click.echo("no agents registered")
    for a in rows:
        info = a.get("info", {})
        if info.get("kind") in ("clones", "pool"):
            n = info.get("clones_total", len(info.get("clones") or []))
            what = f"{info['kind']}: {n} clone(s)"
        else:
            what = f"{info.get('image', '?')}@{info.get('version', '?')}"
        where = info.get("host") or "-"
        state = "online " if a.get("online") else "OFFLINE"
        click.echo(f"{a['instance']:24} {state} {what:34} host {where:16} pid {info.get('pid', '-'):>7}  "
                   f"seen {_ago(float(a['seen_ago']))}  requests {a['pending']} pending, {a['running']} running")
        move = info.get("last_move")
        if isinstance(move, dict) and move.get("summary"):
            click.echo(f"  last move: {move['summary']}")
        for p in info.get("pools") or []:
            err = f", last refill error: {p['error']}" if p.get("error") else ""
            click.echo(f"  pool {p.get('name', '?')} of {p.get('base', '?')}: {p.get('ready', '?')} ready, "
                       f"{p.get('in_use', '?')} in use, target {p.get('size', '?')}{err}")
        for c in (info.get("clones") or []) if info.get("kind") == "clones" else []:
            click.echo(f"  clone {c.get('name', '?')}: {c.get('image', '?')}@{c.get('version', '?')}, "
                       f"{c.get('modified_chunks', '?')} modified chunk(s)")


def register(cli: click.Group) -> None:
    for cmd in (boot_files, host, agents):
        cli.add_command(cmd)
