"""Authentication of submitting users (RFC 4954 AUTH on the server side).

* :mod:`mta.auth.passwords` — salted scrypt password hashes (self-describing strings)
  and CRAM-MD5 secrets;
* :mod:`mta.auth.md5` — MD5 with an exportable state, for the stored HMAC-MD5
  states CRAM-MD5 (RFC 2195) is checked against;
* :mod:`mta.auth.users` — the users file (``user:hash[:cram]`` lines) and its atomic rewrite;
* :mod:`mta.auth.checker` — the ``twisted.cred`` checker/realm/portal the SMTP server
  logs users in through; hash checks run on a small dedicated thread pool;
* :mod:`mta.auth.limiter` — per-address failure counters that slow down and then
  refuse password guessing.
"""
