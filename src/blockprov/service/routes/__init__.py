"""The HTTP API's routes, one ``APIRouter`` per area; ``create_app`` (service/app.py) adds their
routes in the order of ``ROUTERS``, which is also the order of the OpenAPI document and of matching.

A new route module: an ``APIRouter`` named ``router`` whose handlers take ``request: Request`` and
reach the repository through ``Service.of(request)`` (service/state.py), listed in ``ROUTERS``. A route whose
scope is not the default (GET: ``read``, anything else: ``write``) is listed in service/access.py."""

from __future__ import annotations

from fastapi import APIRouter

from blockprov.service.routes import agents, boot, chunks, images, ops, profiles, sites

ROUTERS: tuple[APIRouter, ...] = (ops.router, images.router, chunks.router, boot.router, profiles.router,
                                  agents.router, sites.router)
