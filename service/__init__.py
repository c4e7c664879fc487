"""The online system and the system of record: the chat and feedback API, the policy engine, the
store. Imports nothing from `training` or `deploy`."""
