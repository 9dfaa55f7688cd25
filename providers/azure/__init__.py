"""``provider: azure``: Azure Key Vault (extra ``azure``: azure-identity and the Key Vault SDKs).

``provider`` is the Provider; ``params`` parses upstream's parameters, ``auth`` builds credentials,
``content`` shapes secrets, keys and certificates into files, ``errors`` classifies failures.
Importing this package imports no SDK: the registry imports ``provider`` on first use.
"""
