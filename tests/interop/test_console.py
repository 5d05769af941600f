"""The operator's console (``/ui/``) in a real browser: Debian's chromium, headless, driven by selenium
through Debian's chromedriver (never a downloaded one).

One served repository (``blockprov serve``) with tokens, two registered agents — a real ``blockprov
attach`` agent (pc-07), and one registered through the API as an agent does (pc-08, whose reports
the test changes) — and a host assignment. In the browser: log in with a token (a bad one first),
see the images and a version diff, move a tag and see it with who did it, assign a version to a
host, ask pc-07 for a snapshot and see the request complete and the new version appear, see pc-08's
hydration change without reloading, see a host's last boot appear (live) after it asked for its boot script,
see a pool (``blockprov pool serve``, reporting to the repository) with its ready and in-use counts
change live when an instance is handed out, see HTML in a label and a host name shown as text, and
be refused a tag move with a read token. Screenshots of each page go to docs/console/ (docs/operations.md
shows them).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from blockprov import boot
from blockprov.catalog.tokens import TokenStore
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, require_tool, run_cli
from tests.procs import Proc, start_agent, start_server, start_serving

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver: selenium must not fetch its own
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
MIB = 1 << 20
EVIL_LABEL = "<script>document.title='pwned'</script>"
EVIL_HOST = "<b>front-desk</b>"
WAIT = 30.0  # seconds any one thing may take to appear


def shot(driver: WebDriver, name: str) -> None:
    """Save the whole page (not only the window) as docs/console/NAME.png; docs/operations.md shows them."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {  # type: ignore[attr-defined]
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 3000), "scale": 1}})
    (SHOTS / f"{name}.png").write_bytes(base64.b64decode(png["data"]))


def until(driver: WebDriver, what: str, pred: Callable[[WebDriver], Any], timeout: float = WAIT) -> Any:
    """Wait (bounded) for ``pred``; a page swapped in meanwhile by the live update is retried."""
    def check(d: WebDriver) -> Any:
        try:
            return pred(d)
        except StaleElementReferenceException:
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, f"waited {timeout:g} s for {what}")


def texts(driver: WebDriver, css: str) -> list[str]:
    """The text of every element matching ``css``, read inside the wait: an element the live update
    replaces between the wait and a later ``.text`` would be stale."""
    return [str(e.text) for e in driver.find_elements(By.CSS_SELECTOR, css)]


def shows(driver: WebDriver, css: str, wanted: str) -> None:
    """Wait (bounded) until an element matching ``css`` shows ``wanted``: after a form or a link the
    old page may still be there for a moment."""
    until(driver, f"{css} to show {wanted!r}", lambda d: wanted in " ".join(texts(d, css)))


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    require_tool("chromium")
    require_tool("chromedriver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager (if it ran at all) must not download
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
              "--disable-gpu", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A repository with two versions, tokens, a host assignment, served, with two agents."""
    data = tmp_path / "repo"
    repo = LocalRepository(data)
    v1, _ = import_image(repo, make_image(tmp_path / "v1.raw", 8 * MIB, seed=5), "lab:v1",
                         labels={"os": "debian-12", "note": EVIL_LABEL})
    disk = tmp_path / "v2.raw"
    make_image(disk, 8 * MIB, seed=5)
    with open(disk, "r+b") as f:  # v2: v1 with its second MiB rewritten
        f.seek(MIB)
        f.write(os.urandom(MIB))
    v2, _ = import_image(repo, disk, "lab:v2", labels={"os": "debian-12", "change": "security updates"})
    repo.set_tag("lab", "prod", v1)
    repo.set_boot_files("lab:v1", b"kernel", b"initrd", "console=ttyS0")
    repo.set_boot_files("lab:v2", b"kernel", b"initrd", "console=ttyS0")
    repo.assign_host("52:54:00:12:34:56", "lab:prod", "quiet")
    repo.assign_host("pc-07", "lab:v2")
    tokens = TokenStore(repo.catalog.db)
    write, _ = tokens.create("write", "admin")
    read, _ = tokens.create("read", "viewer")
    agent, _ = tokens.create("write", "agent-pc07")  # a snapshot uploads and commits: write
    repo.close()
    server, url = start_server(data)
    procs: list[Proc] = [server]
    try:
        pc07, _banner = start_agent(tmp_path / "cache", "lab:v1", tmp_path / "pc07.sock", "--instance", "pc-07",
                                    repo_url=url, env={"BLOCKPROV_TOKEN": agent})
        procs.append(pc07)
        pool_dir = tmp_path / "pool"
        run_cli("--repo", url, "--token", agent, "pool", "create", "kiosks", "--from", "lab:v1", "--size", "2",
                "--dir", str(pool_dir))
        pool, _banner = start_serving("pool", "serve", "kiosks", "--dir", str(pool_dir), "--instance", "pool-kiosks",
                                      repo_url=url, env={"BLOCKPROV_TOKEN": agent})
        procs.append(pool)
        api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {write}"}, timeout=10)
        yield {"url": url, "v1": v1, "v2": v2, "write": write, "read": read, "api": api, "pool": pool_dir}
        api.close()
    finally:
        for p in reversed(procs):
            p.stop()


def report_pc08(lab: dict[str, Any], percent: float) -> None:
    """Register (or heartbeat) pc-08 as an agent does, with what it reports."""
    r = lab["api"].put("/v1/agents/pc-08", json={
        "image": "lab", "version": lab["v1"], "host": EVIL_HOST, "pid": 4242,
        "hydration": {"state": "running", "percent": percent}, "modified_chunks": 17, "fetch_latency_ms": 3.2})
    assert r.status_code in (200, 201), r.text


def login(driver: WebDriver, url: str, token: str) -> None:
    driver.get(url + "/ui/login")
    box = driver.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def test_console_in_a_real_browser(browser: WebDriver, lab: dict[str, Any]) -> None:
    d, url, v1, v2 = browser, lab["url"], lab["v1"], lab["v2"]
    report_pc08(lab, 12.5)
    until(d, "pc-07 to register", lambda _d: any(a["instance"] == "pc-07"
                                                  for a in lab["api"].get("/v1/agents").json()["agents"]))

    # -- logging in: a bad token is refused and the page says so; a write token gets in
    d.get(url + "/ui/images")
    until(d, "the login page", lambda d: "/ui/login" in d.current_url)
    login(d, url, "bpt_not-a-real-token")
    until(d, "the login refusal", lambda d: any("not valid" in x for x in texts(d, "#login-error")))
    shot(d, "login")
    login(d, url, lab["write"])
    until(d, "the images page", lambda d: d.current_url.endswith("/ui/images"))
    shows(d, "#viewer", "admin · write")
    row = text_of(d, "#images tr[data-image=lab]")
    assert "prod" in row and "v1" in row and "v2" in row and v1[:12] in row
    shot(d, "images")

    # -- an image: versions, labels escaped, a diff, a tag moved (promotion) with who and when
    d.find_element(By.LINK_TEXT, "lab").click()
    until(d, "the versions", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#versions tbody tr")) == 2)
    labels = text_of(d, f"#versions tr[data-version='{v1}'] .labels")
    assert EVIL_LABEL in labels  # shown as text, never run: the title is still ours
    assert "pwned" not in d.title and not d.find_elements(By.CSS_SELECTOR, "#versions script")
    Select(d.find_element(By.ID, "diff-a")).select_by_value(v1)
    Select(d.find_element(By.ID, "diff-b")).select_by_value(v2)
    d.find_element(By.ID, "diff-go").click()
    diff = until(d, "the diff", lambda d: texts(d, "#diff"))[0]
    assert "16 chunks (1.0 MiB)" in diff and "1048576–2097152" in diff, diff
    tag = d.find_element(By.ID, "tag-name")
    tag.send_keys("prod")
    Select(d.find_element(By.ID, "tag-version")).select_by_value(v2)
    d.find_element(By.ID, "tag-move").click()
    until(d, "the tag move", lambda d: any("Moved lab:prod → " + v2[:12] in x for x in texts(d, "#flash")))
    first = text_of(d, "#history tbody tr:first-child")
    assert "lab:prod" in first and v2[:12] in first and v1[:12] in first and "admin" in first
    assert "prod" in text_of(d, f"#versions tr[data-version='{v2}']")
    d.find_element(By.ID, "diff-go").click()  # the defaults: the newest version against the one before
    assert "16 chunks" in until(d, "the diff again", lambda d: texts(d, "#diff"))[0]
    shot(d, "image")

    # -- machines: a host boots (its last boot is recorded), is assigned another version; pc-08's
    #    hydration changes without a reload
    d.find_element(By.LINK_TEXT, "Machines").click()
    until(d, "the hosts", lambda d: d.find_elements(By.CSS_SELECTOR, "#hosts tr[data-host='52:54:00:12:34:56']"))
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56'] .last-boot", "never booted")
    pick = "#hosts tr[data-host='52:54:00:12:34:56'] input[type=checkbox]"
    d.find_element(By.CSS_SELECTOR, pick).click()  # ticked before the live update must stay ticked
    d.execute_script("window.notReloaded = true")
    r = lab["api"].get("/v1/boot/52-54-00-12-34-56")  # as iPXE asks: lab:prod names v2 now
    assert r.status_code == 200 and r.text.startswith("#!ipxe"), r.text
    assert "never booted" in text_of(d, "#hosts tr[data-host='52:54:00:12:34:56'] .last-boot")  # a script is no boot
    assert lab["api"].get(boot.parse_script(r.text)["initrd"]).status_code == 200  # the whole initrd: booted
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56'] .last-boot", "sent " + v2[:12])  # live, no reload
    assert d.execute_script("return window.notReloaded === true")
    assert d.find_element(By.CSS_SELECTOR, pick).is_selected()
    Select(d.find_element(By.ID, "assign-ref")).select_by_value("lab:v1")
    Select(d.find_element(By.ID, "assign-policy")).select_by_value("restore")  # the arguments field left empty
    d.find_element(By.ID, "assign-go").click()
    until(d, "the assignment",
          lambda d: any("Assigned lab:v1 to 52:54:00:12:34:56" in x for x in texts(d, "#flash")))
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56']", "lab:v1")
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56'] .policy", "restore")
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56'] .args", "quiet")  # kept, not wiped
    shows(d, "#hosts tr[data-host='52:54:00:12:34:56'] .last-boot", "sent " + v2[:12])  # what it booted
    assert "never booted" in text_of(d, "#hosts tr[data-host='pc-07'] .last-boot")
    shows(d, "#agents tr[data-agent='pc-08']", EVIL_HOST)  # a host name as text
    shows(d, "#agents tr[data-agent='pc-08'] .hyd", "12.5 %")
    d.execute_script("window.notReloaded = true")
    report_pc08(lab, 63.0)
    until(d, "pc-08's new hydration", lambda d: "63.0 %" in text_of(d, "#agents tr[data-agent='pc-08'] .hyd"))
    assert d.execute_script("return window.notReloaded === true")

    # -- ask the real agent for a snapshot and follow it to completion; the version appears
    Select(d.find_element(By.ID, "ask-instance")).select_by_value("pc-07")
    Select(d.find_element(By.ID, "ask-op")).select_by_value("snapshot")
    d.find_element(By.ID, "ask-to").send_keys("lab:snap1")
    d.find_element(By.ID, "ask-go").click()
    # the previous page's flash stays until the form's answer replaces it: wait for the new one
    until(d, "the request", lambda d: any("Asked for a snapshot: pc-07" in x for x in texts(d, "#flash")))
    d.execute_script("window.notReloaded = true")  # the completion too must arrive by the live update
    done = until(d, "the snapshot to complete", lambda d: [
        r for r in texts(d, "#requests tr[data-state=done]") if "lab:snap1" in r])
    assert "new version" in done[0]
    assert d.execute_script("return window.notReloaded === true")
    shot(d, "machines")
    d.find_element(By.LINK_TEXT, "Images").click()
    until(d, "the new version's tag", lambda d: "snap1" in text_of(d, "#images tr[data-image=lab]"))

    # -- pools: the pool agent's report; a hand-out appears without a reload
    d.find_element(By.LINK_TEXT, "Pools").click()
    until(d, "the pool's report", lambda d: texts(d, "#pools tr[data-pool=kiosks] .ready") == ["2"])
    assert texts(d, "#pools tr[data-pool=kiosks] .in-use") == ["0"]
    assert f"lab@{v1}" in text_of(d, "#pools tr[data-pool=kiosks]")
    d.execute_script("window.notReloaded = true")
    run_cli("pool", "acquire", "kiosks", "--host", "front-desk", "--dir", str(lab["pool"]))
    until(d, "the hand-out", lambda d: texts(d, "#pools tr[data-pool=kiosks] .in-use") == ["1"])
    shows(d, "[data-clones-agent=pool-kiosks]", "front-desk")
    assert d.execute_script("return window.notReloaded === true")
    shot(d, "pools")
    d.find_element(By.LINK_TEXT, "Health").click()
    until(d, "the health tiles", lambda d: "reachable" in text_of(d, "#catalog-state"))
    shows(d, "#store-state", "reachable")
    until(d, "a request rate", lambda d: "/s" in text_of(d, "#health-live"))
    shot(d, "health")

    # -- a read token sees everything but is refused a tag move, with the scope it needs named
    d.find_element(By.CSS_SELECTOR, "form[action='/ui/logout'] button").click()
    until(d, "the login page", lambda d: "/ui/login" in d.current_url)
    login(d, url, lab["read"])
    until(d, "the images page", lambda d: d.current_url.endswith("/ui/images"))
    shows(d, "#viewer", "viewer · read")
    d.get(url + "/ui/images/lab")
    d.find_element(By.ID, "tag-name").send_keys("prod")
    Select(d.find_element(By.ID, "tag-version")).select_by_value(v1)
    d.find_element(By.ID, "tag-move").click()
    refusal = until(d, "the refusal", lambda d: texts(d, "#denied"))[0]
    assert "needs a token with the write scope" in refusal and "yours has the read scope" in refusal
    shot(d, "denied")
    tags = {i["name"]: i["tags"] for i in lab["api"].get("/v1/images").json()["images"]}
    assert tags["lab"]["prod"] == v2  # unchanged by the refused move
