"""Voting ensemble across model families, with deadlines, a quorum, dynamic selection and a
shadow challenger. See README.md."""
