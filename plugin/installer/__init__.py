"""The backend installer that runs inside QGIS: an analyst gets a working backend without a terminal.

It creates the backend's Python environment **outside the plugin folder** (QGIS replaces the plugin folder on every
plugin update), installs the backend package shipped with the plugin with its pinned dependencies, and records the
installation so the plugin can start it and offer an update when the plugin ships a newer backend.

Modules, bottom up (pure Python except ``task``):

* ``locations`` - the installation folder per platform and what lies in it;
* ``record`` - ``installation.json``: which environment is in use, its version and the source it was built from;
* ``interpreters`` - a Python >= 3.11 on the system or named by the user, and the NVIDIA driver check;
* ``uv`` - uv, bootstrapped from the package index as a wheel (no pip, no exec bits needed from the plugin zip);
* ``commands`` - the uv command lines for the chosen interpreter, compute (CPU/CUDA) and package sources;
* ``proxy`` - QGIS's proxy settings as the environment variables uv reads;
* ``progress`` - uv's output turned into progress, a phase line and a time estimate;
* ``task`` - the QgsTask that runs it all with a live log and cancel, leaving no half environment behind.
"""
