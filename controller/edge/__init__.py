"""The HTTP edge: routes and handlers; where requests enter and answers leave."""
