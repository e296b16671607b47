"""gRPC servers: one servicer per service translating proto <-> domain, plus the app that composes them."""
