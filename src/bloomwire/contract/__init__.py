"""The contract: topic tree, event payloads, order lifecycle, geometry. Imports nothing else of Bloomwire."""
