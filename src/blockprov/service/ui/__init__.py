"""The operator's console: ``/ui/`` on ``blockprov serve``, server-rendered HTML over the same repository.

Why it is shaped like this:

* **Same process, same rules.** The console's routes are ordinary routes of the app (added flat, like
  routes/), so service/access.py gives each one its scope exactly as for the API: a page (GET) needs
  ``read``, a form (POST) needs ``write``; only the login page, the login and logout forms and the
  static files are open. The only difference is where the token comes from: an HTTP-only,
  ``SameSite=Strict`` cookie set by the login form, accepted on ``/ui/`` routes only (the API never
  reads cookies, so it cannot be driven by a forged cross-site request).
* **Server-rendered with Jinja2**, autoescaping everything: labels, host names and agent reports are
  data from others and are never markup. The small script (static/console.js) only re-fetches each
  page's ``live`` block (``?fragment=live``, rendered by the same template) and swaps it in, so the
  escaping is the server's in both cases and the pages work without it (reload).
* **Every asset is ours** (static/, package data): lab machines often have no internet.
* Data is gathered by plain functions (views.py) run on the service's thread pool; the routes
  (pages.py) only render and redirect.

The routes are in pages.py (``create_app`` adds ``pages.router``); this package imports nothing at
import time, because service/access.py imports auth.py and pages.py imports what imports access.py.
"""
