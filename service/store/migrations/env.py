"""Alembic environment: runs on the connection `Store.upgrade` hands over, or on a URL given as
`-x url=...` when called from the alembic command line."""

from alembic import context
from sqlalchemy import create_engine

from service.store.schema import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    url = context.get_x_argument(as_dictionary=True)["url"]
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
