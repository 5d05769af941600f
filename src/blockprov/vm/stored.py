"""Templates stored in the repository, so ``vm clone`` works from any VM directory (any host) that
reaches the repository (issue 14 item 4).

``vm push NAME`` imports a local template's memory file and device state as two versions of the
image ``vmtpl-NAME`` (tags ``memory`` and ``state``): chunked, deduplicated, compressed and verified
like disks, so a mostly-zero 512 MiB RAM costs what the guest touched, and a second template of the
same guest shares most chunks with the first. The template manifest travels as the label
``blockprov.vm-template`` of both versions, and a direct kernel boot's kernel and initrd as the
memory version's boot files. The template's disk already is a version.

``pull`` (what ``vm clone`` does when the VM directory has no such template) exports both versions
into ``ROOT/templates/NAME/`` (every chunk verified on the way) and checks them against the
manifest's BLAKE3 sums before writing the manifest. It copies the whole template before the first
clone starts, or (``lazy``) all but the memory, which vm/lazy.py shows as a file fetched on first touch.

Crash rules: those of template.py: the manifest is written last, so a pull that crashed leaves a
directory without ``template.json`` that the next pull starts over.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockprov.durable import atomic_write, ensure_dir
from blockprov.errors import NotFound, TemplateDamaged
from blockprov.imaging.exporter import export_image
from blockprov.imaging.importer import import_image
from blockprov.manifest import Manifest
from blockprov.repo.base import Repository
from blockprov.vm import template as tpl

LABEL = "blockprov.vm-template"


def image_of(name: str) -> str:
    return f"vmtpl-{name}"


def push(d: Path, repo: Repository, name: str) -> dict[str, Any]:
    """Store the template in ``d`` in the repository (verified first: a damaged one is never shared)."""
    t = tpl.load(d)
    tpl.verify_files(t, d)
    img = image_of(name)
    labels = {LABEL: t.to_json().decode()}
    mem_id, mem_stats = import_image(repo, d / tpl.MEMORY, f"{img}:{tpl.MEMORY}", fmt="raw", labels=labels)
    state_id, _ = import_image(repo, d / tpl.STATE, f"{img}:{tpl.STATE}", fmt="raw", labels=labels)
    if t.machine.kernel:
        repo.set_boot_files(f"{img}@{mem_id}", d / "vmlinuz", d / "initrd", t.machine.append,
                            prepare=False)  # a template's memory is no disk to record a boot of
    return {"template": name, "memory": f"{img}@{mem_id}", "state": f"{img}@{state_id}",
            "stats": {k: v for k, v in vars(mem_stats).items() if isinstance(v, int | float)}}


def pull(d: Path, repo: Repository, name: str, *, lazy: bool = False,
         found: Callable[[Manifest], object] | None = None) -> tpl.Template:
    """Fetch template ``name`` from the repository into ``d`` (which has no manifest). ``lazy``: all
    but the memory, which the caller shows as a file whose pages are fetched on first touch (the
    manifest then says ``lazy`` and names the memory version). ``found`` is called with the memory
    version once the repository has shown the template, before its files are fetched. The files
    are fetched at once, each in its own thread: over a distant link each costs round trips."""
    img = image_of(name)
    try:
        mem = repo.resolve(f"{img}:{tpl.MEMORY}")
    except NotFound:
        raise NotFound(msg=f"no template {name}: not in {d.parent} and no {img}:{tpl.MEMORY} in the repository") \
            from None
    state = repo.resolve(f"{img}:{tpl.STATE}")
    label = mem.labels.get(LABEL)
    if label is None or state.labels.get(LABEL) != label:
        raise TemplateDamaged(name=name, why=f"{img}'s versions do not carry one template manifest ({LABEL})")
    t = tpl.Template.from_json(name, label.encode())
    if found is not None:
        found(mem)
    if lazy:
        t = replace(t, extra={**t.extra, "lazy": True, "memory_version": f"{img}@{mem.id}"})
    if d.exists():
        shutil.rmtree(d)
    ensure_dir(d)
    def boot_file(what: str, dest: Path) -> object:
        atomic_write(dest, repo.boot_file(f"{img}@{mem.id}", what))
        return tpl.seal(dest)

    with ThreadPoolExecutor(4) as pool:
        jobs: list[Future[object]] = [pool.submit(export_image, repo, f"{img}@{state.id}", d / tpl.STATE)]
        if not lazy:
            jobs.append(pool.submit(export_image, repo, f"{img}@{mem.id}", d / tpl.MEMORY))
        if t.machine.kernel:
            jobs += [pool.submit(boot_file, "kernel", d / "vmlinuz"), pool.submit(boot_file, "initrd", d / "initrd")]
        for j in jobs:
            j.result()
    for f, want in ((tpl.STATE, t.state_file),) if lazy else ((tpl.MEMORY, t.memory_file), (tpl.STATE, t.state_file)):
        if (d / f).stat().st_size > want.size:  # an import rounds a file up to whole sectors (zeros)
            with open(d / f, "r+b") as fh:
                fh.truncate(want.size)
        tpl.seal(d / f, tpl.MEMORY_MODE if f == tpl.MEMORY else 0o444)
    tpl.verify_files(t, d)
    atomic_write(d / tpl.MANIFEST, t.to_json())
    return t
