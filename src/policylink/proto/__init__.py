"""Generated protobuf code (``make proto``); the schema is proto/policylink/proto/v1/policylink.proto."""
