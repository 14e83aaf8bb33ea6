def validate_stream_bytes(data): pass  # PLACEHOLDER until schemas land
