"""Application services: each runs one domain engine against PostgreSQL and the outbox.

They sit between the servers (proto) and the pure core: they own transactions,
group commit and restart recovery, and take an event encoder from the server
layer so that nothing here imports generated code.
"""
