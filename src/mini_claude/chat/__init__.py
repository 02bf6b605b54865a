"""Conversations: memory with a turn limit and a token budget (and, later, sessions and agent profiles)."""
