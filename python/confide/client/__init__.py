"""The site client: transport, retry, TLS, and its secure-round participant.

* :class:`Client` -- enrols, signs every request, long-polls for tasks, trains, uploads.
* :class:`SitePolicy` -- what the site insists on, whatever the server's task says.
* :mod:`~confide.client.secure` -- the client side of SecAgg+ rounds.
"""

from confide.client.client import Client, ClientResult, client_ssl_context
from confide.client.policy import SitePolicy

__all__ = ["Client", "ClientResult", "SitePolicy", "client_ssl_context"]
