"""The runtime every process shares: settings, logging, the MQTT connection and service,
the broker launcher."""
