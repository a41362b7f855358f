"""The router: text in and out for users, token ids to and from engines."""
