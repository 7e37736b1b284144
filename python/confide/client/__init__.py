"""The site client: transport, retry, TLS, and its secure-round participant.

* :class:`Client` -- enrols, signs every request, long-polls for tasks, trains, uploads.
* :mod:`~confide.client.secure` -- the client side of SecAgg+ rounds.
"""

from confide.client.client import Client, ClientResult, client_ssl_context

__all__ = ["Client", "ClientResult", "client_ssl_context"]
