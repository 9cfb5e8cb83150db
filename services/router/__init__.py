"""Router: the client entry point (``Router.Generate``, ``ListModels``, ``GetSwarm``), node
selection and onion circuit building. Built in issue #4 on ``swarmserve.native.Circuit``."""
