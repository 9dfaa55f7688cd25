"""``provider: gcp``: Google Secret Manager (extra ``gcp``: google-cloud-secret-manager).

``provider`` is the Provider; ``params`` parses upstream's parameters, ``settings`` the daemon's
own, ``auth`` builds credentials (workload identity), ``client`` calls the API. Importing this
package imports no SDK: the registry imports ``provider`` on first use.
"""
