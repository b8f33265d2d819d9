// The one place where C++ exceptions from the core become Python exceptions.
// Used by every `except +translate_exception` declaration in _core.pxd.
#pragma once

#include <Python.h>

#include <exception>
#include <new>
#include <stdexcept>

#include "mtht/errors.h"

static void translate_exception() {
  try {
    if (PyErr_Occurred()) return;  // a Python error is already set; keep it
    throw;
  } catch (const mtht::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const mtht::KeyError& e) {
    PyErr_SetString(PyExc_KeyError, e.what());
  } catch (const mtht::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what());
  } catch (const mtht::IOError& e) {
    PyErr_SetString(PyExc_OSError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_SetString(PyExc_MemoryError, "mtht: out of memory; the table was not changed");
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "mtht: unknown C++ exception");
  }
}
