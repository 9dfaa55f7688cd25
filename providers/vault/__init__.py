"""``provider: vault``: HashiCorp Vault (extra ``vault``: hvac).

``provider`` is the Provider; ``config`` parses upstream's parameters, ``client`` talks to Vault,
``gojson`` renders values as Go's encoding/json does (upstream's files), ``errors`` classifies
failures. Importing this package imports no SDK: the registry imports ``provider`` on first use.
"""
