"""Image and version commands: import, export, images, versions, show, diff, tag, rm, gc.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import click

from blockprov import humanize as hz
from blockprov.align import runs
from blockprov.boot import stranded
from blockprov.cli._common import (
    Ctx,
    default_data_dir,
    emit,
    json_option,
    labels_option,
    progress_bar,
    size_option,
)
from blockprov.errors import UsageError
from blockprov.manifest import DEFAULT_CHUNK
from blockprov.names import parse_ref
from blockprov.results import to_dict


@click.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=str))
@click.argument("ref", metavar="NAME:TAG")
@click.option("--chunk-size", default=str(DEFAULT_CHUNK), callback=size_option, show_default=True,
              help="Chunk size, a power of two from 4K to 4M.")
@click.option("--format", "fmt", default=None, help="Source format (default: detected by qemu-img).")
@click.option("--label", "labels", multiple=True, callback=labels_option, metavar="KEY=VALUE")
@json_option
@click.pass_obj
def import_cmd(obj: Ctx, source: str, ref: str, chunk_size: int, fmt: str | None, labels: dict[str, str],
               as_json: bool) -> None:
    """Import a disk image (raw, qcow2, vmdk, vhdx, …) as a new version of NAME:TAG."""
    from blockprov.imaging.importer import import_image

    target = parse_ref(ref, allow_version=False)
    obj.create = True  # import is the command that makes a new embedded repository
    with progress_bar(None, f"import {target}", not as_json) as bar:
        vid, stats = import_image(obj.repo, source, target, chunk_size=chunk_size, fmt=fmt, labels=labels,
                                  progress=bar, on_size=bar.set_total)
    d = to_dict(stats) | {"image": target.name, "tag": target.tag, "id": vid}
    if as_json:
        emit(d)
        return
    click.echo(f"imported {source} as {target.name}:{target.tag} = {target.name}@{vid}")
    click.echo(f"  virtual size   {hz.size(stats.source_bytes)} in {stats.chunks} chunks of {hz.size(chunk_size)}")
    click.echo(f"  read           {hz.size(stats.bytes_read)} (holes skipped)")
    click.echo(f"  zero chunks    {stats.zero_chunks} (never stored)")
    click.echo(f"  unique chunks  {stats.unique_chunks}, new to the repository {stats.new_chunks}")
    share = 100.0 * stats.new_bytes_stored / stats.bytes_read if stats.bytes_read else 0.0
    click.echo(f"  new bytes      {hz.size(stats.new_bytes_stored)} stored after dedup and compression "
               f"({share:.1f}% of the data read)")
    if stats.seconds:
        click.echo(f"  time           {stats.seconds:.2f} s "
                   f"({hz.size(stats.source_bytes / stats.seconds)}/s of virtual disk)")


@click.command("export")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--force", "-f", is_flag=True, help="Replace DEST if it is an existing file (without it, refused).")
@json_option
@click.pass_obj
def export_cmd(obj: Ctx, ref: str, dest: str, fmt: str, force: bool, as_json: bool) -> None:
    """Write a version to a new file, or to a block device. An existing file is refused unless
    --force; it is then replaced whole once the export is complete (a failed export leaves it)."""
    from blockprov.imaging.exporter import export_image

    m = obj.repo.resolve(ref)
    with progress_bar(m.stored_bytes_logical(), f"export {ref}", not as_json) as bar:
        export_image(obj.repo, parse_ref(ref), dest, fmt=fmt, progress=bar, force=force)
    if as_json:
        emit({"ref": ref, "id": m.id, "dest": dest, "format": fmt, "size": m.size})
    else:
        click.echo(f"exported {m.image}@{m.id} ({hz.size(m.size)}) to {dest} as {fmt}")


@click.command("images")
@json_option
@click.pass_obj
def images_cmd(obj: Ctx, as_json: bool) -> None:
    """List images, their tags and number of versions."""
    imgs = obj.repo.images()
    if as_json:
        emit(imgs)
        return
    if not imgs:
        click.echo("no images (import one with: blockprov import DISK NAME:TAG)")
    for i in imgs:
        tags = ", ".join(f"{t}→{v}" for t, v in sorted(i.tags.items())) or "-"
        click.echo(f"{i.name:24} {i.versions:3} version(s)  tags: {tags}")


@click.command("versions")
@click.argument("name")
@json_option
@click.pass_obj
def versions_cmd(obj: Ctx, name: str, as_json: bool) -> None:
    """List the versions of an image, oldest first."""
    vs = obj.repo.versions(name)
    if as_json:
        emit(vs)
        return
    for v in vs:
        when = datetime.datetime.fromtimestamp(v.created).isoformat(timespec="seconds")
        click.echo(f"{v.image}@{v.id}  {when}  {hz.size(v.size):>10}  parent={v.parent or '-'}  "
                   f"tags={','.join(v.tags) or '-'}")


@click.command("show")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@json_option
@click.pass_obj
def show_cmd(obj: Ctx, ref: str, as_json: bool) -> None:
    """Show one version: size, chunks, zero chunks, parent, labels."""
    m = obj.repo.resolve(ref)
    d = m.summary() | {"raw_url": obj.repo.raw_url(parse_ref(ref)), "repository": obj.repo.url,
                       "profile": _profile_state(obj, m.image, m.id)}
    if as_json:
        emit(d)
        return
    click.echo(f"{m.image}@{m.id}")
    click.echo(f"  size        {hz.size(m.size)} ({m.size} bytes)")
    click.echo(f"  chunks      {d['chunks']} × {hz.size(m.chunk_size)}: {d['zero_chunks']} zero, "
               f"{d['unique_chunks']} unique stored")
    click.echo(f"  parent      {m.parent or '-'}")
    click.echo(f"  created     {datetime.datetime.fromtimestamp(m.created).isoformat(timespec='seconds')}")
    if m.labels:
        click.echo("  labels      " + ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())))
    if d["raw_url"]:
        click.echo(f"  raw view    {d['raw_url']}")
    p = d["profile"]
    prep = p["preparation"] or {}
    if p["ready"]:
        whose = "its own" if p["own"] else "inherited"
        click.echo(f"  profile     ready: {p['chunks']} chunks in boot order ({whose})")
    else:
        click.echo(f"  profile     not ready: {prep.get('state') or 'none recorded'}"
                   + (f" ({prep['detail']})" if prep.get("detail") else "")
                   + ("" if prep.get("state") in ("queued", "running") else "; the first boot records one"))


def _profile_state(obj: Ctx, image: str, vid: str) -> dict[str, object]:
    """Whether a version's boot profile is ready (its own or inherited), and how its preparation went."""
    own = obj.repo.get_profile(image, vid, inherit=False)
    order = own or obj.repo.get_profile(image, vid)
    return {"ready": bool(order), "own": bool(own), "chunks": len(order or ()),
            "preparation": obj.repo.preparation(f"{image}@{vid}")}


@click.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@json_option
@click.pass_obj
def diff_cmd(obj: Ctx, a: str, b: str, as_json: bool) -> None:
    """Chunks that differ from version A to version B."""
    changed = obj.repo.diff(parse_ref(a), parse_ref(b))
    mb = obj.repo.resolve(b)
    if as_json:
        emit({"a": a, "b": b, "chunk_size": mb.chunk_size, "changed": changed})
        return
    click.echo(f"{len(changed)} of {mb.count} chunks differ ({hz.size(len(changed) * mb.chunk_size)})")
    if changed:
        spans = runs(changed)
        shown = ", ".join(f"{s}" if e - s == 1 else f"{s}-{e - 1}" for s, e in spans[:20])  # inclusive for people
        click.echo(f"  chunks {shown}{' …' if len(spans) > 20 else ''}")


@click.command("tag")
@click.argument("src", metavar="NAME:TAG|NAME@ID")
@click.argument("dst", metavar="NAME:TAG")
@click.pass_obj
def tag_cmd(obj: Ctx, src: str, dst: str) -> None:
    """Point tag DST at the version SRC names."""
    s, d = parse_ref(src), parse_ref(dst, allow_version=False)
    if s.name != d.name:
        raise UsageError(f"tags name versions of the same image ({s.name} ≠ {d.name})")
    m = obj.repo.resolve(s)
    assert d.tag is not None
    obj.repo.set_tag(d.name, d.tag, m.id)
    click.echo(f"{d} → {m.image}@{m.id}")
    following = [h.host for h in obj.repo.hosts() if h.ref == str(d)]
    if following and obj.repo.get_boot_files(f"{m.image}@{m.id}") is None:
        click.echo(f"warning: {stranded(str(d), m.id, following)}", err=True)


@click.command("rm")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.pass_obj
def rm_cmd(obj: Ctx, ref: str) -> None:
    """Remove a tag, or a version with its tags. Chunks go at the next gc."""
    r = parse_ref(ref)
    users = _templates_using(obj, r.name, obj.repo.resolve(r).id) if r.version else []
    for gone in obj.repo.remove(r):
        click.echo(f"removed {gone}")
    for t in users:
        click.echo(f"warning: VM template {t} uses {r} as its disk: it cannot be cloned any more (vm clone says "
                   "so); make the template again from a VM of a version that exists", err=True)


def _templates_using(obj: Ctx, image: str, vid: str) -> list[str]:
    """VM templates whose disk is ``image@vid``: those of this data directory's VM directory and
    those pushed to the repository (issue 27 item 5: an rm left them to fail at `vm clone`)."""
    import json

    from blockprov.vm import stored
    from blockprov.vm.vms import list_templates

    disk = f"{image}@{vid}"
    found: set[str] = set()
    vms = (Path(obj.data_dir) if obj.data_dir else default_data_dir()) / "vms"
    if not obj.repo_url and vms.is_dir():
        found |= {f"{t['template']} ({vms})" for t in list_templates(vms) if t["disk"] == disk}
    for i in obj.repo.images():
        if not i.name.startswith(stored.image_of("")):
            continue
        for v in obj.repo.versions(i.name):
            try:
                t = json.loads(v.labels.get(stored.LABEL) or "{}")
            except ValueError:
                continue
            if isinstance(t, dict) and f"{t.get('image')}@{t.get('version')}" == disk:
                found.add(f"{i.name.removeprefix(stored.image_of(''))} (pushed: {i.name})")
    return sorted(found)


@click.command("gc")
@json_option
@click.pass_obj
def gc_cmd(obj: Ctx, as_json: bool) -> None:
    """Delete chunks no version references (chunks younger than an hour are kept for uploads in progress)."""
    st = obj.repo.gc()
    if as_json:
        emit(st)
    else:
        click.echo(f"removed {st.chunks_removed} chunks ({hz.size(st.bytes_removed)}), kept {st.chunks_kept}"
                   + (f"; compacted {hz.size(st.space_freed)} of pack space" if st.space_freed else ""))


def register(cli: click.Group) -> None:
    for cmd in (import_cmd, export_cmd, images_cmd, versions_cmd, show_cmd, diff_cmd, tag_cmd, rm_cmd, gc_cmd):
        cli.add_command(cmd)
