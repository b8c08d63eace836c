"""The relay: forwarding a request to a worker and its answer back to the client.

Failover and settling outcomes (:mod:`.failover`), the stream relay (:mod:`.stream`) and
single-document calls (:mod:`.forward`), the worker side of both parsed in place by llhttp
(:mod:`.upstream`, :mod:`.framing`), the client's transport (:mod:`.sink`), the bytes all
relays may hold (:mod:`.budget`), the connection pool and targets (:mod:`.pool`,
:mod:`.target`), the watch for departed clients (:mod:`.watch`), and the connections the
controller holds to workers (:mod:`.connections`).
"""
