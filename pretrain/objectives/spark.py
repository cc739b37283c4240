"""SparK and FCMAE objectives (being written)."""
