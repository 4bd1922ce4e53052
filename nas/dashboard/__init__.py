"""nas-dashboard: watch, resume, stop and export studies from the browser.

`state` reads studies, `workers` starts processes, `app` has the routes, `security` guards them,
`optuna_mount` serves optuna-dashboard under /optuna/, `server` puts them together.
"""
