"""``provider: aws``: AWS Secrets Manager and SSM Parameter Store (extra ``aws``: botocore).

``provider`` is the Provider; ``params`` parses upstream's parameters, ``auth`` builds credentials,
``fetch`` calls the APIs, ``errors`` classifies their failures. Importing this package imports no
SDK: the registry (providers/__init__.py) imports ``provider`` on first use.
"""
