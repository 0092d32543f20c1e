"""One hospital's MONAI Label server: the surfaces radiologists, site IT and partners talk to.

- :mod:`.server`: the ASGI app (MONAI Label's, wrapped by the guard, with the ``/gcml`` routes);
- :mod:`.guard`: who may reach what (annotation networks, peer tokens, Host, CORS, upload caps);
- :mod:`.routes`: the ``/gcml`` peer and admin routes;
- :mod:`.trainer`, :mod:`.warm`, :mod:`.train_entry`: the train task and how its subprocess starts;
- :mod:`.infer`: the ``gcml_seg`` infer task (serves the published model);
- :mod:`.datastore`, :mod:`.pacs`, :mod:`.dicom`, :mod:`.labels`: folder and PACS datastores and the
  label checks they share;
- :mod:`.launch`, :mod:`.client`, :mod:`.orthanc`, :mod:`.certs`: starting a server, talking to it,
  a local Orthanc, and a trial PKI.

Importing this package imports nothing else: :mod:`.train_entry` must run before torch is imported.
"""
