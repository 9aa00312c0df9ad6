"""The message bus between processes: ZeroMQ and Unix stream transport, msgpack encoding.

Only this package imports zmq and msgpack (msgspec's msgpack codec); the
layering test (tests/qa/) checks it.  Every message that crosses a process
boundary is declared once, with its fields, their types and its route, in
:mod:`mta.bus.messages`; the sockets that carry them are in
:mod:`mta.bus.sockets`.  Roles import this package and use both by name:
``bus.SpoolMessageCommit(req, envelopes, bodies)``, ``bus.Server(...)``.

Topology (all endpoints in the run directory, created after fork):

    acceptor[i]  StreamClient --connect-->  Unix stream  spool[n]   ("commit-<n>";
                                                      read by the shard's own loop)
    mta CLI      DEALER --connect-->  ROUTER  spool[n]     ("spool-<n>"; the admin too)
    spool[n]     DEALER --connect-->  ROUTER  delivery[d]  ("delivery-<d>"); outcomes come
                 (DeliveryLinks)                           back on the same pair

A request carries a ``req`` number chosen by the sender; the reply echoes it.
High-water marks bound every queue; a send that would block fails instead
(returns False) and the caller pushes back.
"""
from mta.bus.messages import *  # noqa: F401,F403
from mta.bus.messages import __all__ as _messages_all
from mta.bus.sockets import *  # noqa: F401,F403
from mta.bus.sockets import __all__ as _sockets_all

__all__ = [*_messages_all, *_sockets_all]
