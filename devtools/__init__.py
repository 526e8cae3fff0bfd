"""Development tools: local stand-ins for cloud services, used by tests and the demo; not shipped in the image."""  # noqa: E501
